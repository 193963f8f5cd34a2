"""Patch for timm's ``VisionTransformer`` family: a block that runs a reducer (between attention
and MLP for merging, before attention for learned pruning), and a model class whose forward
threads a :class:`TokenState` through the blocks. The attention step, the block and the model
forward are shared with the other families, which register their classes here
(:data:`QKV_PROJECTIONS`, :data:`PATCHED_BLOCKS`, :func:`register_model_class`,
:func:`register_wrapper`, and the hooks of the family's model class; ``patch/eva.py``,
``patch/beit.py``, ``patch/vit_relpos.py``, ``patch/cait.py``, ``patch/naflexvit.py``,
``patch/qwen3_vit.py``, ``patch/video.py``; attentions and blocks of their own in
:data:`ATTENTION_FORWARDS` and :data:`BLOCK_FLOPS`: ``patch/diff_attention.py``,
``patch/parallel.py``).

Nothing here keeps per-forward state on modules: every block owns a fixed ``reducer`` (its r is
a plain int) and the sizes travel with the tokens, so patched models compile with
``torch.compile(fullgraph=True)``; the exceptions are the data-dependent counts of
``local_global`` (``local_threshold``, ``adaptive``: the count is read on the host). Source
tracing, a visualisation aid, stores the last forward's map on the model.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, NoReturn, Protocol

import torch
import torch.nn.functional as F
from timm.layers import Attention, AttentionPoolPrr, HybridEmbed, apply_rot_embed_cat
from timm.models._features import FeatureGetterNet
from timm.models.deit import VisionTransformerDistilled
from timm.models.mlp_mixer import SpatialGatingUnit
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

from kernels import attention
from kernels._triton import vmapped

from ..merge import BlockMerge, TokenState, start_state
from ..merge import unmerge as unmerge_tokens


class TokenReducer(Protocol):
    """One block's reduction step: between its attention and its MLP (merging methods), or
    before its attention (``before_attention``, pruning predictors). ``metric`` names what the
    step reads from the block's attention: "keys" (keys averaged over heads, ToMe's metric),
    "cls_attention" (the class token's attention to every token, averaged over heads),
    "attention_received" (a pair: the keys as for "keys", and the attention each token receives,
    averaged over heads and queries, [B, T]), "attention_sharpness" (a pair: the keys, and each
    token's negative attention entropy Σ_j a_ij log a_ij averaged over heads, [B, T]) or None."""

    before_attention: bool
    metric: str | None

    def __call__(self, state: TokenState, metric: Tensor | None) -> TokenState: ...

    def num_removed(self, num_tokens: int, grid: tuple[int, ...]) -> int | None:
        """How many tokens the step removes from ``num_tokens`` on a ``grid`` of patches
        ((rows, cols) for images, (frames, rows, cols) for video; for
        plans and FLOPs); ``None`` when the data decides (adaptive counts)."""
        ...

    def matching_flops(self, num_tokens: int, removed: int, attn: Attention) -> int:
        """Matmul FLOPs the step spends deciding what to reduce from ``num_tokens``, given that it
        removes ``removed`` (:func:`tokenprune.plan`'s count; for :func:`tokenprune.flops`)."""
        ...


SUPPORTED_FAMILIES = (
    "timm VisionTransformer / VisionTransformerDistilled with Block or ResPostBlock + Attention: "
    "ViT (class token, avg or map pooling), DeiT (incl. distilled), DeiT3, DINOv2, "
    "register-token (*_reg*) and qk-norm variants, differential attention (DiffAttention) and parallel blocks "
    "(ParallelScalingBlock, DiffParallelScalingBlock); timm Eva with EvaBlock / EvaBlockPostNorm and "
    "EvaAttention / AttentionRope: EVA, EVA-02, DINOv3, Perception Encoder, RoPE-ViT (RoPE, GQA); "
    "timm Beit: BEiT, BEiT v2 (relative position bias); timm VisionTransformerRelPos (vit_relpos_*); "
    "timm Cait (CaiT: talking heads, class attention); "
    "timm NaFlexVit (SigLIP 2 NaFlex, RADIO) on image batches and packed sequences; "
    "timm Qwen3VitEncoder / Qwen3VitClassifier (Qwen3-VL vision encoders); "
    "timm VisionTransformerSAM (Segment Anything's encoder, with method='merge_unmerge'); "
    "tokenprune.models.VideoVisionTransformer (VideoMAE video ViT)"
)

QKVProjection = Callable[[Any, Tensor], tuple[Tensor, Tensor, Tensor]]


def _timm_qkv(attn: Attention, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    batch, num_tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, num_tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return qkv.unbind(0)


# Attention class → how it projects tokens to q, k, v ([B, heads, T, head_dim] each, before q/k
# norm and RoPE); everything after that is shared by :func:`attend`. A registry, so that a
# family's module adds its attention classes (``patch/eva.py``, ...) and anything else is refused.
QKV_PROJECTIONS: dict[type[nn.Module], QKVProjection] = {Attention: _timm_qkv}


@dataclass(frozen=True)
class AttentionForward:
    """An attention class that :func:`attend` cannot run (its maps are not softmax(q·kᵀ)·v):
    its own forward, with :func:`attend`'s signature and results, and the FLOPs of its
    products between tokens (:func:`attend`'s are 4·T²·heads·head_dim). It gives its reducer
    only the keys (:func:`check_reducers`)."""

    forward: Callable[..., tuple[Tensor, Any]]
    matmul_flops: Callable[[nn.Module, int], int]


# Attention class → its own forward; families register theirs (patch/diff_attention.py).
ATTENTION_FORWARDS: dict[type[nn.Module], AttentionForward] = {}

# Original block class → its FLOPs(block, tokens, removed), for a block whose work does not split
# into the ``attn`` and ``mlp`` that tokenprune.flops counts (patch/parallel.py).
BLOCK_FLOPS: dict[type[nn.Module], Callable[[nn.Module, int, int], int]] = {}


def attention_forward(attn: nn.Module) -> Callable[..., tuple[Tensor, Any]]:
    """What a patched block runs for ``attn``: its class's own forward (:data:`ATTENTION_FORWARDS`),
    else :func:`attend`."""
    own = ATTENTION_FORWARDS.get(type(attn))
    return attend if own is None else own.forward


def takes_attention_kernel(fused: bool, backend: str | None, bias: Tensor | None, attn_mask: Tensor | None, is_causal: bool) -> bool:
    """Whether attention runs :func:`kernels.attention` (the size bias built in): fused
    attention over merged tokens (``backend`` is set only for them) with no other mask."""
    return fused and backend is not None and bias is None and attn_mask is None and not is_causal


def refuse_float16_keep_mask(bias: Tensor | None, q: Tensor) -> None:
    """A training keep mask's gradient does not fit float16: :func:`attend` takes the softmax in
    float32 for it, which SDPA and the blocks' own attention paths (differential attention,
    parallel blocks) cannot."""
    if bias is not None and q.dtype == torch.float16:
        raise ValueError(
            "training a token-dropping method in float16 would round its keep mask's gradient to zero in "
            "differential attention and parallel blocks: train in bfloat16 or float32"
        )


def refuse_dropping(config: Any, reader: str) -> None:
    """Raise a TypeError for a method that drops patches where ``reader`` reads every patch
    position (a dropped patch would reach it as zeros)."""
    if getattr(config, "drops_tokens", False):
        raise TypeError(
            f"{type(config).__name__} drops tokens, but {reader} read every patch position: a dropped patch "
            "would reach them as zeros. Use a merging method (tome, pitome, local_global)"
        )


def linear_flops(tokens: int, layer: nn.Module) -> int:
    """FLOPs of a linear layer on ``tokens`` tokens (2 per multiply-add); 0 for anything else."""
    return 2 * tokens * layer.in_features * layer.out_features if isinstance(layer, nn.Linear) else 0


def sdpa_mask(bias: Tensor | None, key_bias: Tensor | None, attn_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """One additive SDPA mask from a [B, 1, T, T] ``bias`` and [B, T] ``key_bias`` (either may be
    None; ``attn_mask`` when both are: merged tokens never carry a user mask, which
    :meth:`ReducingViT._run_blocks` refuses)."""
    if key_bias is not None:
        key_mask = key_bias[:, None, None, :].to(dtype)
        bias = key_mask if bias is None else bias + key_mask
    return attn_mask if bias is None else bias


def head_dim(attn: nn.Module) -> int:
    """Per-head width of q and k: timm's ``head_dim``, or from the qkv projection (BEiT's
    attention keeps no ``head_dim``)."""
    return getattr(attn, "head_dim", None) or attn.qkv.out_features // (3 * attn.num_heads)


def _rotate(attn: nn.Module, t: Tensor, rope: Tensor) -> Tensor:
    """RoPE on the non-prefix tokens, as timm's RoPE attentions apply it."""
    p, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
    return torch.cat([t[:, :, :p, :], apply_rot_embed_cat(t[:, :, p:, :], rope, half=half)], dim=2)


def attend(
    attn: Attention,
    x: Tensor,
    bias: Tensor | None,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    metric: str | None = None,
    *,
    key_bias: Tensor | None = None,
    backend: str | None = None,
    rope: Tensor | None = None,
    position_bias: tuple[Tensor, ...] = (),
    key_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """timm's attention forward plus an additive bias, also returning a reduction metric.

    Three kinds of bias: ``bias``, an additive [B, 1|H, T, T] mask (DynamicViT's training keep
    mask), ``position_bias``, the model's own terms [1|B, H, T, T] (BEiT's relative position
    biases: the block's table and the shared one, added in order on the manual path as timm does),
    and ``key_bias``, one [B, T] float32 value per key (proportional attention, ToMe
    Eq. 1: softmax(qkᵀ/√d + log s) with ``key_bias = log s``). With ``backend`` set (the
    tokens have been merged), fused attention runs :func:`kernels.attention`, which takes the
    key bias without a T×T mask and tiles short sequences tightly; with ``backend=None`` it is
    timm's SDPA call. ``metric`` "keys" returns the keys (after ``k_norm``) averaged over heads,
    ToMe's choice; "cls_attention" the class token's attention weights averaged over heads
    (EViT), [B, T]; "attention_received" and "attention_sharpness" the keys plus a per-token
    importance from the full attention map (see :class:`TokenReducer`). Keys are read before
    RoPE (``rope``, [B, 1|heads, T - prefix, D] or timm's [T - prefix, D]): similarity of
    content, not of position. Works for every class in :data:`QKV_PROJECTIONS` and mirrors
    timm 1.0's op order exactly, so an unreduced model is bit-identical.

    Talking-heads attention (CaiT: ``proj_l`` mixes the heads' logits before the softmax,
    ``proj_w`` their weights after it) takes every bias after ``proj_l``, where a mask or
    log s acts on the softmax directly, and counts ``proj_w``'s bias once per input token a key
    stands for (``key_weight``, [B, T]: its size, or its keep mask): then a token merged from s
    identical tokens gets exactly the attention those s tokens got.
    """
    batch, num_tokens, _ = x.shape
    gate_proj = getattr(attn, "gate", None)  # (BEiT's attention has no gate, q/k-norm or output norm)
    gate = gate_proj(x).sigmoid() if gate_proj is not None else None
    q, k, v = QKV_PROJECTIONS[type(attn)](attn, x)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    keys = k
    if rope is not None:
        q, k = _rotate(attn, q, rope).type_as(v), _rotate(attn, k, rope).type_as(v)
    kv_groups = getattr(attn, "num_kv_groups", 1)  # grouped-query attention: expand after RoPE, as timm does
    if kv_groups > 1:
        k, v = k.repeat_interleave(kv_groups, dim=1), v.repeat_interleave(kv_groups, dim=1)
    dropout = attn.attn_drop.p if attn.training else 0.0
    talking_heads = hasattr(attn, "proj_l")
    # A metric read from the whole attention map takes the map from the attention itself: one
    # q·kᵀ and softmax, multiplied with v, instead of a fused call plus a second q·kᵀ for the map.
    full_map = metric in ("attention_received", "attention_sharpness")
    # A dropped key keeps ~1e-9 of its weight (KEEP_EPS), below float16's range, so float16
    # attention would round the keep mask's gradient to zero: masked float16 attention takes its
    # softmax in float32 instead (as DynamicViT's own masked softmax does).
    float32_softmax = full_map or (bias is not None and q.dtype == torch.float16)
    fused = getattr(attn, "fused_attn", False) and not float32_softmax and not talking_heads
    position_sum = None
    for term in position_bias:
        position_sum = term if position_sum is None else position_sum + term
    if position_sum is not None:
        bias = position_sum if bias is None else bias + position_sum
    use_kernel = takes_attention_kernel(fused, backend, bias, attn_mask, is_causal)
    if not (use_kernel and metric in (None, "keys")):
        bias = sdpa_mask(bias, key_bias, None, x.dtype)  # the size bias as a mask, for the other paths
    if bias is not None:
        attn_mask = bias  # merged tokens never carry a user mask: _run_blocks refuses that case
    if use_kernel:
        out = attention(q, k, v, key_bias, attn.scale, backend, dropout)
    elif fused:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal)
    else:
        weights = (q * attn.scale) @ k.transpose(-2, -1)
        if talking_heads:
            weights = attn.proj_l(weights.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if is_causal:
            causal = weights.new_full((num_tokens, num_tokens), float("-inf")).triu_(1)
            weights = weights + causal
        elif attn_mask is position_sum and len(position_bias) > 1:
            for term in position_bias:  # timm's manual BEiT: one term after the other (same bits)
                weights = weights + term
        elif attn_mask is not None:
            weights = weights.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else weights + attn_mask
        # (float64 stays float64: a float32 softmax would round a float64 model's attention output)
        softmax_dtype = torch.promote_types(weights.dtype, torch.float32)
        probs = weights.to(softmax_dtype).softmax(dim=-1) if float32_softmax else weights.softmax(dim=-1)
        mixed = probs.to(v.dtype)
        if talking_heads:
            mixed = _mix_heads(attn.proj_w, mixed, key_weight)
        out = attn.attn_drop(mixed) @ v
    out = out.transpose(1, 2).reshape(batch, num_tokens, out.shape[1] * out.shape[-1])  # (not -1: a batch of 0 leaves it ambiguous)
    if hasattr(attn, "norm"):
        out = attn.norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    if metric == "keys":
        return out, keys.mean(dim=1)
    if metric == "cls_attention":
        logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias[..., :1, :]
        return out, logits.softmax(dim=-1).mean(dim=1)[:, 0]
    if metric == "attention_received":
        return out, (keys.mean(dim=1), probs.mean(dim=(1, 2)))
    if metric == "attention_sharpness":
        return out, (keys.mean(dim=1), torch.special.xlogy(probs, probs).sum(dim=-1).mean(dim=1))
    return out, None


def _mix_heads(proj_w: nn.Linear, probs: Tensor, key_weight: Tensor | None) -> Tensor:
    """Talking heads' mixing of attention weights across heads ([B, H, T, T]), its bias
    counted ``key_weight`` times per key ([B, T]; None: once, timm's own op). Under a training
    keep mask a dropped token's bias counts 0 even on its own row, where it still attends to
    itself (DynamicViT Eq. 7): its output is never read by a kept token, so it does not matter."""
    if key_weight is None or proj_w.bias is None:
        return proj_w(probs.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    refuse_hooks(proj_w, "this patched block's attn.proj_w (talking heads' mixing of attention weights)", _PROJ_W_HOOKS, patched=True)
    bias = proj_w.bias * key_weight.to(probs.dtype)[:, None, :, None]  # [B, 1, T_keys, H]
    return (F.linear(probs.permute(0, 2, 3, 1), proj_w.weight) + bias).permute(0, 3, 1, 2)


# A masked-out key keeps exp(log ε) ≈ 1e-9 of its weight relative to a kept key of the same logit,
# so the output equals attention over the kept keys to about 1e-9·exp(gap) per dropped key (gap:
# how far its logit exceeds the kept ones'; 2e-7 at a gap of 10, 5e-3 at 20), while
# log(ε + (1-ε)·keep) still passes DynamicViT's gradient to the mask:
# ∂out/∂keep_j = ∂out/∂bias_j · (1-ε)/ε = (e_j / Z)(v_j - out), as for a multiplicative mask.
KEEP_EPS = 1e-9


def keep_bias(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, 1, T, T] attention bias that masks out dropped keys except for each token itself
    (DynamicViT Eq. 7: a dropped token still attends to itself)."""
    key_bias = torch.log(KEEP_EPS + (1.0 - KEEP_EPS) * keep.squeeze(-1).float())[:, None, None, :]
    eye = torch.eye(keep.shape[1], dtype=torch.bool, device=keep.device)
    return key_bias.masked_fill(eye, 0.0).to(dtype)


# The key bias of a padding token (size 0) instead of log 0 = -inf: exp(-1000) is 0 in float32,
# but a finite value keeps the attention kernel's online softmax finite over a tile of padding
# keys.
PADDING_KEY_BIAS = -1000.0


def log_size(size: Tensor, dtype: torch.dtype) -> Tensor:
    """log ``size`` for tokens of ``dtype``: in float32 (half-precision tokens too, whose
    attention kernel adds the bias in float32), in float64 for a float64 model, whose logits a
    float32 log would round by ~1e-8."""
    return size.to(torch.promote_types(size.dtype, torch.promote_types(dtype, torch.float32))).log()


def pooling_key_bias(weights: Tensor, padded: bool, dtype: torch.dtype = torch.float32) -> Tensor:
    """The [B, T] float32 (float64 for tokens of ``dtype`` float64, see :func:`log_size`) key bias of
    attention pooling that counts each token ``weights`` ([B, T, 1]) times: log(ε + w) is
    log(size) for merged tokens and masks a training keep mask's dropped tokens with a finite
    gradient (:data:`KEEP_EPS`); with ``padded``, tokens of weight 0 are padding, masked by
    :data:`PADDING_KEY_BIAS`."""
    weights = weights.squeeze(-1)
    accumulate = torch.promote_types(weights.dtype, torch.promote_types(dtype, torch.float32))
    bias = torch.log(KEEP_EPS + weights.to(accumulate))
    return bias.masked_fill(weights == 0, PADDING_KEY_BIAS) if padded else bias


def size_bias(state: TokenState, prop_attn: bool) -> Tensor | None:
    """The [B, T] key bias that the tokens' sizes call for: log s with proportional attention
    (ToMe Eq. 1), and for padding (size 0, ``state.padded``) :data:`PADDING_KEY_BIAS` with or
    without it; None when there is none (nothing merged, or no proportional attention). Float32,
    float64 for a float64 model (:func:`log_size`)."""
    if state.size is None or not (prop_attn or state.padded):
        return None
    size = state.size.squeeze(-1)
    if not state.padded:
        return log_size(size, state.x.dtype)
    logs = log_size(size, state.x.dtype) if prop_attn else torch.zeros_like(size)
    return logs.masked_fill(size == 0, PADDING_KEY_BIAS)


class ReducingBlockMixin:
    """A transformer block that runs ``self.reducer`` between attention and MLP (ToMe Fig. 1),
    before attention (pruning predictors) or around both (merge_unmerge, which merges inside the
    block and gives every token back), placed in front of the block's own class. The residual steps are the block family's
    (:meth:`_attention_input`, :meth:`_add_attention`, :meth:`_add_mlp`), so everything the timm
    block does is kept: LayerScale, drop-path, q/k-norm, fused attention, RoPE, relative
    position bias.
    ``reducer`` is ``None`` for blocks that do not reduce.
    """

    attn: nn.Module
    reducer: TokenReducer | None
    prop_attn: bool
    backend: str  # where attention over merged tokens runs (kernels.attention)

    def forward(  # type: ignore[override]
        self, state: TokenState, attn_mask: Tensor | None = None, is_causal: bool = False, position: Tensor | None = None
    ) -> TokenState:
        """One block on the current tokens. ``position`` is what the model hands every block
        about the *input* tokens' positions (Eva: the rotary embedding of the patches; BEiT and
        vit_relpos: a shared relative position bias; None for absolute position embeddings, which travel
        inside the tokens); the block gives it to the current tokens after any pre-attention
        reduction (:meth:`_rope`, :meth:`_position_bias`)."""
        check_block_input(state)
        refuse_hooks(self.attn, "this patched block's attn", ATTENTION_HOOKS, patched=True)
        reducer = self.reducer
        if getattr(reducer, "unmerges_in_blocks", False):  # merge_unmerge: the tokens leave the block unmerged
            if reducer.merged_count(state.num_tokens):
                return state._replace(x=self._merge_attend_unmerge(state.x, reducer))
            reducer = None  # (nothing to merge at this token count)
        if reducer is not None and reducer.before_attention:
            state = reducer(state, None)
            reducer = None
        x = state.x
        bias, key_bias = self._biases(state)
        merged = state.size is not None
        # How many input tokens each key counts for, where attention mixes heads after the softmax
        # (talking heads): its keep mask while training a pruning method, else its size.
        counted = state.keep
        if counted is None and key_bias is not None:
            counted = state.size
        attn_out, metric = attention_forward(self.attn)(
            self.attn,
            self._attention_input(x),
            bias,
            attn_mask,
            is_causal,
            reducer.metric if reducer is not None else None,
            key_bias=key_bias,
            # Merged tokens: attention on the kernel built for them. Unmerged: timm's exact call.
            backend=self.backend if merged else None,
            rope=self._rope(state, position),
            position_bias=self._position_bias(state, position),
            key_weight=counted.squeeze(-1) if counted is not None else None,
        )
        state = state._replace(x=self._add_attention(x, attn_out))
        if reducer is not None:
            state = reducer(state, metric)
        return state._replace(x=self._add_mlp(state.x))

    def _merge_attend_unmerge(self, x: Tensor, step: Any) -> Tensor:
        """The block with ToMe for SD's merging (:mod:`tokenprune.methods.merge_unmerge`): merge
        the attention input's tokens (prefix tokens protected), run attention, with proportional
        attention, and the MLP on the merged tokens, and add their updates to every token they
        cover."""
        h = self._attention_input(x)
        merging = BlockMerge(h, step.merged_count(x.shape[1]), step.num_protected, backend=self.backend)
        key_bias = log_size(merging.size, h.dtype).squeeze(-1) if self.prop_attn else None
        attn_out, _ = attention_forward(self.attn)(
            self.attn, merging.merge(h), None, key_bias=key_bias, backend=self.backend
        )
        x = self._add_attention(x, merging.unmerge(attn_out))
        if not step.merge_mlp:
            return self._add_mlp(x)
        return self._add_mlp(x, lambda tokens: merging.unmerge(self.mlp(merging.merge(tokens))))

    def _biases(self, state: TokenState) -> tuple[Tensor | None, Tensor | None]:
        """The attention biases the tokens call for: a training keep mask as an additive
        [B, 1, T, T] mask (float32 for a float16 stream: its gradient does not fit float16), and
        the key bias of :func:`size_bias` (log sizes, padding masked), [B, T] (None where absent)."""
        bias = None
        if state.keep is not None:
            bias = keep_bias(state.keep, torch.float32 if state.x.dtype == torch.float16 else state.x.dtype)
        return bias, size_bias(state, self.prop_attn)

    def _rope(self, state: TokenState, position: Tensor | None) -> Tensor | None:
        """The rotary embedding of the current tokens (None: the block has no RoPE)."""
        return None

    def _position_bias(self, state: TokenState, position: Tensor | None) -> tuple[Tensor, ...]:
        """Additive attention biases between the current tokens, [1|B, H, T, T] each (none: ())."""
        return ()

    # The residual steps come from a steps class placed before this one (PreNormSteps, ...).
    def _attention_input(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _add_attention(self, x: Tensor, attn_out: Tensor) -> Tensor:
        raise NotImplementedError

    def _add_mlp(self, x: Tensor, mlp: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """x plus the MLP's update (``mlp``: what runs in the MLP's place, default the MLP)."""
        raise NotImplementedError


class PreNormSteps:
    """Residual steps of a pre-norm block with timm LayerScale (``ls1``/``ls2``): timm's
    ``Block`` and ``RelPosBlock``."""

    def _attention_input(self, x: Tensor) -> Tensor:
        return self.norm1(x)

    def _add_attention(self, x: Tensor, attn_out: Tensor) -> Tensor:
        return x + self.drop_path1(self.ls1(attn_out))

    def _add_mlp(self, x: Tensor, mlp: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        return x + self.drop_path2(self.ls2((self.mlp if mlp is None else mlp)(self.norm2(x))))


class PostNormSteps:
    """Residual steps of a post-norm block (norm after attention and after the MLP): timm's
    ``ResPostBlock``, ``ResPostRelPosBlock`` and ``EvaBlockPostNorm``."""

    def _attention_input(self, x: Tensor) -> Tensor:
        return x

    def _add_attention(self, x: Tensor, attn_out: Tensor) -> Tensor:
        return x + self.drop_path1(self.norm1(attn_out))

    def _add_mlp(self, x: Tensor, mlp: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        return x + self.drop_path2(self.norm2((self.mlp if mlp is None else mlp)(x)))


class ReducingBlock(PreNormSteps, ReducingBlockMixin, Block):
    """timm ``Block`` (pre-norm, LayerScale ``ls1``/``ls2``) with token reduction."""


class ReducingResPostBlock(PostNormSteps, ReducingBlockMixin, ResPostBlock):
    """timm ``ResPostBlock`` (norm after attention and MLP, ``vit_*_rpn``) with token reduction."""


# Original block class → its reducing subclass; families register theirs (patch/eva.py, beit.py, ...).
PATCHED_BLOCKS: dict[type[nn.Module], type[nn.Module]] = {Block: ReducingBlock, ResPostBlock: ReducingResPostBlock}


# forward_head's default ``size``: distinguishes "not passed" from an explicit None.
_NOT_GIVEN: Any = object()


def _pool_by_size(model: VisionTransformer) -> bool:
    """Whether the head pools over tokens, so merged tokens must count by their size."""
    return getattr(model, "attn_pool", None) is not None or model.global_pool in ("avg", "avgmax")


def classifies_every_token(model: nn.Module) -> bool:
    """Whether the head maps every token to logits instead of pooling (timm's ``global_pool=""``)."""
    return getattr(model, "attn_pool", None) is None and getattr(model, "global_pool", None) == ""


def pool_includes_prefix(model: nn.Module) -> bool:
    """Whether the head's pooling reads the prefix tokens too: timm ``VisionTransformer``'s
    ``pool_include_prefix``; Eva (no such option) pools attention over every token and averages
    over the patches alone."""
    if hasattr(model, "pool_include_prefix"):
        return model.pool_include_prefix
    return getattr(model, "attn_pool", None) is not None


def _pool_by_weight(model: VisionTransformer) -> bool:
    """Whether the head's pooling must see the tokens' weights: sizes (above), or a training
    keep mask, whose dropped tokens (weight 0) must not win a max pooling either."""
    return _pool_by_size(model) or model.global_pool == "max"


def _weighted_mean(x: Tensor, weights: Tensor) -> Tensor:
    """Mean of ``x`` [B, T, C] over its tokens, each counted ``weights`` [B, T, 1] times; in
    float32 like timm's mean (float64 for float64): bf16 weights would round each to ~3 digits.
    A total of 0 (padding alone, as in timm's NaFlexVit, or a training draw that dropped every
    patch) pools to 0; it is divided by 1, not clamped to a tiny value, whose inverse (~1e38)
    would scale the decisions' gradients to inf."""
    weights = weights.to(torch.promote_types(x.dtype, torch.float32))  # (float32 weights / total: 1e-8 off in float64)
    total = weights.sum(dim=1, keepdim=True)
    total = torch.where(total > 0, total, torch.ones_like(total))
    return (x.to(torch.promote_types(x.dtype, torch.float32)) * (weights / total)).sum(dim=1).to(x.dtype)


def _prr_pool(pool: AttentionPoolPrr, x: Tensor, size: Tensor, padded: bool) -> Tensor:
    """timm's ``AttentionPoolPrr`` (``global_pool="prr"``: parameter-free self-attention over
    every token, then the class token or the mean) counting each token by its weight ``size``
    [B, T, 1], as MAP pooling does: log w added to its key's logits (proportional attention;
    a training keep mask's dropped tokens masked out, padding too) and a weighted mean."""
    batch, num_tokens, dim = x.shape
    x = pool.pre_norm(x)
    qkv = x.reshape(batch, num_tokens, pool.num_heads, pool.head_dim).transpose(1, 2)
    mask = pooling_key_bias(size, padded, x.dtype).to(x.dtype)[:, None, None, :]
    if pool.fused_attn:
        x = F.scaled_dot_product_attention(qkv, qkv, qkv, attn_mask=mask)
    else:
        x = (((qkv * pool.scale) @ qkv.transpose(-2, -1)) + mask).softmax(dim=-1) @ qkv
    x = pool.post_norm(x.transpose(1, 2).reshape(batch, num_tokens, dim))
    return x[:, 0] if pool.pool == "token" else _weighted_mean(x, size)


class SettingsThroughPatch:
    """Mixin of every patched model class: published ToMe's ``model.r = 16`` would set an
    attribute nothing reads here, a silent no-op; it raises instead, naming the call that works."""

    @property
    def r(self) -> NoReturn:
        # (nn.Module.__getattr__ then reports the missing attribute: read model.tokenprune_config.r)
        raise AttributeError("r")

    @r.setter
    def r(self, value: Any) -> NoReturn:
        config = getattr(reducing_model(self), "tokenprune_config", None)
        options = [f.name for f in dataclasses.fields(config)] if dataclasses.is_dataclass(config) else ["r"]
        if options and "r" not in options:  # (SAM's merge_unmerge, the dropping methods): patch(model, r=...) would refuse r
            raise AttributeError(
                f"published ToMe's model.r = {value!r} would change nothing here, and you cannot set r with "
                f"tokenprune.patch either: the model's method, {type(config).__name__}, has no r; set its options "
                f"with tokenprune.patch(model, {options[0]}=...) (its options: {sorted(options)})"
            )
        raise AttributeError(
            f"set r with tokenprune.patch(model, r={value!r}): published ToMe's model.r = {value!r} would change nothing here"
        )


class ReducingViT(SettingsThroughPatch):
    """Mixin placed in front of the model's own class (``VisionTransformer`` or a subclass).

    ``forward_features`` keeps timm's contract and returns the reduced tokens; ``forward`` also
    threads their sizes into the head so that average and attention pooling weigh each merged
    token by the number of patches it covers.
    """

    tokenprune_config: Any
    blocks: nn.Sequential

    def forward_tokens(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False, trace_source: bool | None = None
    ) -> TokenState:
        """Embed, run the reducing blocks and the final norm; returns tokens with sizes (and
        the source index when ``trace_source``, default: the config's)."""
        if trace_source is None:
            trace_source = self.tokenprune_config.trace_source
        if self._blocks_called_whole:
            refuse_hooks(self.blocks, "model.blocks of this patched model", _BLOCKS_HOOKS, patched=True)
        state = self._run_blocks(x, attn_mask, is_causal, trace_source)
        if self._stores_source():  # the last forward's map, or none if it did not trace
            self._tokenprune_source = self._traced_source(x, state) if trace_source else None
        return state

    def _stores_source(self) -> bool:
        """Whether this forward keeps its source map for :func:`tokenprune.source`: with
        ``trace_source``, except while ``torch.export`` traces it. Export runs the forward on fake
        tensors and leaves a newly set attribute on the model, so ``source`` would hand back a
        FakeTensor of symbolic values; the exported program keeps no map either."""
        return self.tokenprune_config.trace_source and not torch.compiler.is_exporting()

    def _traced_source(self, x: Any, state: TokenState) -> tuple[Tensor | None, int]:
        """What :func:`tokenprune.source` reads: the source index with padding (NaFlex's packed
        sequences) marked -1, as dropped tokens are, so that its map counts what ``state.size``
        counts: padding merged into a patch is no part of it."""
        valid = self._valid_tokens(x)
        index = state.source_index if valid is None else state.source_index.masked_fill(~valid, -1)
        if vmapped(index):
            # A tensor batched by torch.func.vmap cannot outlive the transform: kept here, it
            # would make tokenprune.source fail after it with functorch's "escaped" error. None
            # says so (what the transformed function returns is the way out).
            return None, state.num_tokens
        return index, state.num_tokens

    def _run_blocks(
        self,
        x: Tensor,
        attn_mask: Tensor | None,
        is_causal: bool,
        trace_source: bool,
        on_block: Callable[[int, TokenState], None] | None = None,
        num_blocks: int | None = None,
    ) -> TokenState:
        _refuse_fx_tracing(x)
        self._check_input(x)
        if (attn_mask is not None or is_causal) and any(b.reducer is not None for b in self.blocks):
            raise ValueError(
                "attn_mask/is_causal refer to the input token positions and cannot follow merged tokens; "
                "call tokenprune.unpatch(model) for masked attention"
            )
        grid = self._token_grid(x)
        valid = self._valid_tokens(x)
        x, position = self._embed(x)
        # Blocks give positions (RoPE, relative bias) to merged tokens from their sources: trace them.
        trace_source = trace_source or self._positions_follow_sources
        track_positions = self.tokenprune_config.track_positions
        if track_positions and (patches := x.shape[1] - block_prefix_tokens(self)) != math.prod(grid):
            raise ValueError(
                f"{type(self.tokenprune_config).__name__} places tokens by their patches' positions, and "
                f"{patches} of the {math.prod(grid)} patches entered the blocks: timm's patch dropout "
                "(patch_drop_rate > 0, in train()) is not supported with it; create the model with patch_drop_rate=0"
            )
        state = start_state(x, trace_source, grid, track_positions, valid)
        for i, block in enumerate(self.blocks):
            if num_blocks is not None and i == num_blocks:
                break
            block_position = position[i] if position is not None and self._position_per_block else position
            if self.grad_checkpointing and torch.is_grad_enabled():
                state = checkpoint(block, state, attn_mask, is_causal, block_position, use_reentrant=False)
            else:
                state = block(state, attn_mask, is_causal, block_position)
            if on_block is not None:
                on_block(i, state)
        return self._after_blocks(state)

    def _after_blocks(self, state: TokenState) -> TokenState:
        """What runs between the last block and the head: the final norm (CaiT adds its class
        token first)."""
        return state._replace(x=self.norm(state.x))

    def _check_input(self, x: Tensor) -> None:
        """Raise a clear error for an input the blocks' token grid cannot come from (families
        override it: video clips, NaFlexVit's any size and packed patches)."""
        if not isinstance(x, Tensor) or x.ndim != 4:
            got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            one_image = " (one image: add the batch dimension, x.unsqueeze(0))" if isinstance(x, Tensor) and x.ndim == 3 else ""
            raise ValueError(f"expected a batch of images [B, C, H, W], got {got}{one_image}")
        self.image_grid(self, *x.shape[-2:])

    # Family hooks that hold for the unpatched model too (plans and FLOPs are asked of either):
    # called on the family's class, ``family(model).image_grid(model, ...)``. Two are optional,
    # looked up where used: ``packed_grid`` (NaFlexVit's packed patches) and ``blocks_flops``
    # (SAM's blocks, which run on the patch grid).

    @staticmethod
    def image_grid(model: nn.Module, height: int, width: int) -> tuple[int, int]:
        """The patch grid timm's forward makes of a height × width image, or a ValueError
        naming the sizes the model takes. timm takes any size when the position embedding
        follows the grid (``dynamic_img_size``); a size the patch embedding lets through
        (``strict_img_size=False``; timm's ``HybridEmbed`` never checks) when there is no
        position embedding (ViTamin) or the grid is the one it was made for; else only
        ``img_size``. Other sizes must be whole patches (of a hybrid's stem: its whole reduction),
        unless the embedding pads."""
        embed = model.patch_embed
        if (height, width) == tuple(embed.img_size):
            return (int(embed.grid_size[0]), int(embed.grid_size[1]))  # (a hybrid's, as measured)
        lets_through = not embed.strict_img_size or isinstance(embed, HybridEmbed)
        if not (getattr(model, "dynamic_img_size", False) or lets_through):
            _refuse_image_size(model, (height, width))
        hybrid = isinstance(embed, HybridEmbed)
        # timm's patch embedding asserts whole patches unless it pads; a convolutional stem rounds
        # partial strides up, where dynamic_feat_size rounds down: only exact multiples are planned.
        if embed.dynamic_img_pad:
            step = embed.feature_ratio if hybrid else (1, 1)
        else:
            step = embed.feat_ratio(as_scalar=False)
        if height % step[0] or width % step[1]:
            unit = "its convolutional stem's reduction" if hybrid else "its patch size"
            remedy = "" if hybrid else "; create it with dynamic_img_pad=True for any size"
            raise ValueError(
                f"the model takes image sides that are multiples of {step[0]}x{step[1]} ({unit}), got "
                f"{height}x{width}{remedy}"
            )
        grid = tuple(int(n) for n in embed.dynamic_feat_size((height, width)))
        position_follows = getattr(model, "dynamic_img_size", False) or getattr(model, "pos_embed", None) is None
        if position_follows or grid == tuple(embed.grid_size):
            return (grid[0], grid[1])
        _refuse_image_size(model, (height, width))

    @staticmethod
    def patch_embedding(model: nn.Module) -> nn.Module:
        """The module that turns the image into patch tokens (for its FLOPs)."""
        return model.patch_embed

    @staticmethod
    def check_modules(model: nn.Module) -> None:
        """Raise a TypeError for a module outside ``blocks`` that the patch runs itself but
        cannot run exactly (CaiT's class-attention blocks); nothing to check elsewhere."""

    @staticmethod
    def after_blocks_flops(model: nn.Module, tokens: int, grid: tuple[int, ...]) -> int:
        """FLOPs per image of what runs between the last block and the pooling, on the
        ``tokens`` output tokens or on the unmerged patch ``grid`` (CaiT's class-attention
        blocks, the Qwen3 ViT's projector; nothing elsewhere)."""
        return 0

    @staticmethod
    def check_method(model: nn.Module, config: Any) -> None:
        """Raise a TypeError for a method the family cannot run exactly (nothing to check here)."""

    def _embed(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Patch embedding, position embedding and pre-norm: the tokens entering the first
        block, and what every block is told about the input tokens' positions (the blocks'
        ``position``; None here: absolute position embeddings travel inside the tokens)."""
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x), None

    def _valid_tokens(self, x: Any) -> Tensor | None:
        """[B, T] bool, False for the padding among the tokens entering the first block (NaFlexVit's
        packed sequences); None: no padding."""
        return None

    # The method ``tokenprune.patch(model, **options)`` applies when none is named.
    default_method = "tome"
    # What backend="auto" runs in this family's blocks: "auto" lets each op choose (Triton on a
    # GPU, within the limits in kernels/), "torch" keeps a family whose measured Triton path is
    # slower on the PyTorch path.
    auto_backend = "auto"
    # Whether the prefix tokens run through the blocks (CaiT adds its class token after them).
    _prefix_in_blocks = True
    # Whether ``position`` holds one entry per block (timm's "mixed" RoPE: [depth, ...]).
    _position_per_block = False
    # Whether the blocks read positions from the tokens' sources (RoPE, relative bias).
    _positions_follow_sources = False
    # Whether the unpatched forward runs ``model.blocks`` as one module (timm's ``self.blocks(x)``
    # on its nn.Sequential), so that hooks on it fire there; patched, the blocks run one by one.
    _blocks_called_whole = False

    # forward_intermediates' channels-first maps on the token grid ("NCTHW" for clips).
    map_format = "NCHW"

    def _token_grid(self, x: Tensor) -> tuple[int, ...]:
        """The static patch grid of the input: (rows, cols) for images."""
        return self.image_grid(self, *x.shape[-2:])

    def forward_features(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False, unmerge: bool = False
    ) -> Tensor:
        """timm's features: the reduced tokens, or with ``unmerge=True`` the full token grid
        [B, prefix + H·W, C] for dense heads, each patch carrying the feature of the token that
        absorbed it (every position counts once there: pool it with
        ``forward_head(tokens, size=None)``)."""
        if not unmerge:
            return self.forward_tokens(x, attn_mask, is_causal).x
        state = self.forward_tokens(x, attn_mask, is_causal, trace_source=True)
        return unmerge_tokens(state.x, state.source_index)

    def forward_head(self, x: Tensor, pre_logits: bool = False, size: Tensor | None = _NOT_GIVEN) -> Tensor:
        """timm's head; pass the tokens' weights (``state.pool_weights`` from
        :meth:`forward_tokens`) when the model pools over tokens, so the pooling counts each merged
        token by the patches it covers. ``size=None`` says every token counts once (what
        ``pool_weights`` is after pruning without merging)."""
        if size is _NOT_GIVEN:
            self._refuse_unsized_pooling()
            size = None
        return self._forward_head_sized(x, size, pre_logits)

    def _refuse_unsized_pooling(self) -> None:
        """Raise when the head pools over tokens the blocks may have merged but is given no sizes."""
        config = self.tokenprune_config
        # Every token has size 1 (pool_weights is None), so pooling each once is exact, where
        # tokens leave every block unmerged (merge_unmerge) or are dropped without merging (EViT
        # without fusion, in training too), except while DynamicViT trains: its dropped tokens
        # stay, and the head needs their keep mask.
        # A max pooling needs no sizes, but does need the mask: a masked token could win it.
        masked = self.training and getattr(config, "masks_in_training", False)
        unit_sizes = getattr(config, "unmerges_in_blocks", False) or (getattr(config, "drops_tokens", False) and not masked)
        needs_weights = _pool_by_weight(self) if masked else _pool_by_size(self)
        if needs_weights and any(b.reducer is not None for b in self.blocks) and not unit_sizes:
            pool = getattr(self, "attn_pool", None)
            pooling = "prr" if isinstance(pool, AttentionPoolPrr) else "map" if pool is not None else repr(self.global_pool)
            needed = "keep mask of the tokens training dropped" if masked else "sizes"
            raise ValueError(
                f"this model pools by {pooling} and reduces "
                f"tokens: the pooling needs the token {needed}. Use model(x), or "
                "state = model.forward_tokens(x); model.forward_head(state.x, size=state.pool_weights)"
            )

    def _forward_head_sized(self, x: Tensor, size: Tensor | None, pre_logits: bool, padded: bool = False) -> Tensor:
        """The head, pooling by ``size`` (None: every token once); ``padded``: tokens of size 0 are
        padding, which attention pooling masks out exactly (as every other pooling weighs it 0)."""
        if size is None or not _pool_by_weight(self):
            return super().forward_head(x, pre_logits=pre_logits)  # type: ignore[misc]
        if not pool_includes_prefix(self):
            x, size = x[:, self.num_prefix_tokens :], size[:, self.num_prefix_tokens :]
        if isinstance(getattr(self, "attn_pool", None), AttentionPoolPrr):
            refuse_hooks(self.attn_pool, "this patched model's attn_pool (timm's parameter-free prr pooling)", _PRR_HOOKS, patched=True)
            x = _prr_pool(self.attn_pool, x, size, padded)
        elif getattr(self, "attn_pool", None) is not None:
            # Always weighted, like the average below (ToMe pools by size even without
            # proportional attention in the blocks).
            x = self.attn_pool(x, attn_mask=pooling_key_bias(size, padded, x.dtype).to(x.dtype)[:, None, None, :])
        else:
            weights = size.float()
            mean = peak = None
            if self.global_pool != "max":  # avg, avgmax
                mean = _weighted_mean(x, weights)
            if self.global_pool != "avg":  # max, avgmax
                # Over the tokens present: weight 0 is a token a training keep mask dropped. An
                # image with none present (a training draw that dropped every patch) pools to 0,
                # as the average does, not to -inf (NaN logits, NaN gradients for the whole batch).
                # (Padding alone keeps timm's NaFlexVit result, NaN after fc_norm.)
                absent = weights == 0
                peak = x.masked_fill(absent, float("-inf")).amax(dim=1)
                if not padded:
                    peak = peak.masked_fill(absent.all(dim=1), 0.0)
            x = mean if peak is None else peak if mean is None else 0.5 * (peak + mean)
        fc_norm = getattr(self, "fc_norm", None)  # (CaiT has none)
        x = self.head_drop(fc_norm(x) if fc_norm is not None else x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if classifies_every_token(self):
            # timm's global_pool="": logits for every input token, as unpatched, each patch taking
            # those of the token that absorbed it (reduced tokens alone could not be told apart).
            if self.training and getattr(self.tokenprune_config, "masks_in_training", False):
                raise ValueError(
                    "this model's head classifies every token (global_pool=''), and DynamicViT training "
                    "keeps the tokens it drops, masked: their logits would count. Pool the head "
                    "(reset_classifier(num_classes, global_pool='token' or 'avg')) to train the predictors"
                )
            state = self.forward_tokens(x, attn_mask, is_causal, trace_source=True)
            return self._forward_head_sized(unmerge_tokens(state.x, state.source_index), None, pre_logits=False)
        state = self.forward_tokens(x, attn_mask, is_causal)
        return self._forward_head_sized(state.x, state.pool_weights, pre_logits=False, padded=state.padded)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str | None = None,
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Any:
        """timm's ``forward_intermediates`` on the full token grid: merged tokens are unmerged
        (each patch gets the feature of the token that absorbed it), so NCHW maps and dense heads
        work unchanged on a reduced model. ``output_fmt``: the family's ``map_format`` (the
        default: NCHW for images, NCTHW for clips) or NLC."""
        from timm.models._features import feature_take_indices

        output_fmt = self.map_format if output_fmt is None else output_fmt
        if output_fmt not in (self.map_format, "NLC"):
            raise ValueError(f"output_fmt must be {self.map_format!r} or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        intermediates: list[Tensor] = []

        def keep(i: int, state: TokenState) -> None:
            if i in take_indices:
                # Normed, then unmerged: a dropped patch stays 0 (no feature), not the norm's bias.
                y = self.norm(state.x) if norm else state.x
                intermediates.append(unmerge_tokens(y, state.source_index))

        state = self._run_blocks(
            x, attn_mask, is_causal, trace_source=True, on_block=keep, num_blocks=max_index + 1 if stop_early else None
        )
        if self._stores_source():  # like forward_tokens: the map of the last forward
            self._tokenprune_source = self._traced_source(x, state)
        p = block_prefix_tokens(self)
        prefix_tokens = [y[:, :p] for y in intermediates] if p else None
        intermediates = [y[:, p:] for y in intermediates]
        if output_fmt == self.map_format:
            grid = self._token_grid(x)
            if intermediates and (present := intermediates[0].shape[1]) != math.prod(grid):
                # timm's patch dropout (training) removed patches before the blocks: the tokens no
                # longer fill the grid (timm's own forward_intermediates reshapes them into maps of
                # the wrong width; here reshape failed naming neither cause nor remedy).
                raise ValueError(
                    f"timm's patch dropout (patch_drop_rate > 0, in train()) left {present} of the "
                    f"{math.prod(grid)} patches, which fill no {'x'.join(map(str, grid))} map: call model.eval() "
                    "for maps, or pass output_fmt='NLC' for the tokens that entered the blocks"
                )
            intermediates = [y.reshape(y.shape[0], *grid, y.shape[-1]).movedim(-1, 1).contiguous() for y in intermediates]
        final = unmerge_tokens(state.x, state.source_index)
        if output_dict:
            result: dict[str, Any] = {"image_intermediates": intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                result["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                result["image_features"] = final
            return result
        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        return intermediates if intermediates_only else (final, intermediates)


class ReducingVisionTransformer(ReducingViT, VisionTransformer):
    """timm ``VisionTransformer`` with token reduction."""

    takes_unmerging = True  # merge_unmerge too (positions travel inside the tokens)
    _blocks_called_whole = True

    @staticmethod
    def check_method(model: nn.Module, config: Any) -> None:
        if getattr(config, "unmerges_in_blocks", False):
            for i, block in enumerate(model.blocks):
                if original_block_class(block) not in (Block, ResPostBlock):
                    raise TypeError(
                        f"{type(config).__name__} runs in timm's Block and ResPostBlock; blocks[{i}] is a "
                        f"{original_block_class(block).__name__}: use tome"
                    )


class ReducingVisionTransformerDistilled(ReducingViT, VisionTransformerDistilled):
    """timm DeiT ``VisionTransformerDistilled`` with token reduction."""

    takes_unmerging = True
    _blocks_called_whole = True
    check_method = ReducingVisionTransformer.check_method

# Original class → its reducing subclass. Static classes, so patched models pickle by reference.
PATCHED_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    VisionTransformer: ReducingVisionTransformer,
    VisionTransformerDistilled: ReducingVisionTransformerDistilled,
}
_ORIGINAL_CLASSES = {patched: original for original, patched in PATCHED_CLASSES.items()}


def register_model_class(original: type[nn.Module], patched: type[nn.Module]) -> None:
    """Patch models of class ``original`` into ``patched``, and unpatch them back (a family's
    module calls this when imported)."""
    PATCHED_CLASSES[original] = patched
    _ORIGINAL_CLASSES[patched] = original


@dataclass(frozen=True)
class Wrapper:
    """A model class that holds a supported model (or another wrapper) and runs its own forward
    around it (timm's Qwen3VitClassifier around its encoder, a features_only FeatureGetterNet):
    tokenprune patches the inner model."""

    attribute: str  # where the inner model is
    head_flops: Callable[[nn.Module, int], int]  # FLOPs per image of the wrapper's own head, given the patches
    # The wrapper's class while its model is patched: the class with SettingsThroughPatch, so
    # that published ToMe's wrapper.r = 16 raises rather than changing nothing.
    guarded: type[nn.Module]
    runs_inner_head: bool = True  # False: its forward stops at the inner model's blocks (features_only)
    reads_every_patch: bool = False  # its outputs read every patch position: token dropping is refused


class GuardedFeatureGetterNet(SettingsThroughPatch, FeatureGetterNet):
    """timm's ``features_only=True`` backbone while tokenprune has patched its ViT."""


# Wrapper class → where its reducing model is; families register theirs (patch/qwen3_vit.py).
WRAPPERS: dict[type[nn.Module], Wrapper] = {}


def register_wrapper(original: type[nn.Module], wrapper: Wrapper) -> None:
    """Patch through models of class ``original`` as ``wrapper`` says, guarding them with
    ``wrapper.guarded`` while the model inside is patched."""
    WRAPPERS[original] = wrapper
    _ORIGINAL_CLASSES[wrapper.guarded] = original


# timm's ``features_only=True`` backbone of a ViT is a FeatureGetterNet: its forward is the
# inner model's forward_intermediates (on the unmerged grid here, so dense heads take it as is).
register_wrapper(
    FeatureGetterNet,
    Wrapper("model", lambda model, patches: 0, GuardedFeatureGetterNet, runs_inner_head=False, reads_every_patch=True),
)


def wrapper_of(model: nn.Module) -> Wrapper | None:
    """The model's entry in :data:`WRAPPERS` (guarded or not), or None if it wraps nothing."""
    return WRAPPERS.get(original_class(model))


def wrapper_chain(model: nn.Module) -> list[nn.Module]:
    """``model``, the timm wrappers inside it (:data:`WRAPPERS`), and the model they hold,
    outermost first (as :func:`runtime_chain` for the runtime wrappers)."""
    chain = [model]
    while (wrapper := wrapper_of(chain[-1])) is not None:
        chain.append(getattr(chain[-1], wrapper.attribute))
    return chain


def reducing_model(model: nn.Module) -> nn.Module:
    """The model whose blocks reduce tokens: ``model`` itself, or the one its wrappers hold
    (timm's, and torch.compile's or data parallelism's, which plans and FLOPs see through)."""
    return wrapper_chain(unwrap_runtime(model))[-1]


class GuardedDataParallel(SettingsThroughPatch, nn.DataParallel):
    """``nn.DataParallel`` around a model that tokenprune has patched through it."""


class GuardedDistributedDataParallel(SettingsThroughPatch, nn.parallel.DistributedDataParallel):
    """``DistributedDataParallel`` around a model that tokenprune has patched through it."""


# Data parallelism's wrappers (these exact classes) → their class while the model inside is
# patched. (torch.compile's wrapper hands ``r`` to the model already.)
RUNTIME_GUARDS: dict[type[nn.Module], type[nn.Module]] = {
    nn.DataParallel: GuardedDataParallel,
    nn.parallel.DistributedDataParallel: GuardedDistributedDataParallel,
}
_ORIGINAL_CLASSES.update({guarded: original for original, guarded in RUNTIME_GUARDS.items()})


def guard_wrappers(model: nn.Module, guarded: bool) -> None:
    """Give the wrappers that ``model`` holds the patched model in, data parallelism's and
    timm's, their guarded class (``guarded``), or their own back. (Wrapping a model after
    patching it is out of reach: ``DataParallel(patched).r = 16`` still sets an attribute.)"""
    runtime = [m for m in runtime_chain(model)[:-1] if original_class(m) in RUNTIME_GUARDS]
    for wrapper in runtime + wrapper_chain(unwrap_runtime(model))[:-1]:
        original = original_class(wrapper)
        guard = RUNTIME_GUARDS.get(original) or wrapper_of(wrapper).guarded
        wrapper.__class__ = guard if guarded else original


def unwrap_runtime(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's and data parallelism's wrappers (``model`` if none).
    Patching it in place is seen by them: Dynamo guards on the class and recompiles, and
    DataParallel copies the model onto its devices at every forward."""
    return runtime_chain(model)[-1]


def runtime_chain(model: nn.Module) -> list[nn.Module]:
    """``model``, the runtime wrappers inside it, and the model they hold, outermost first."""
    chain = [model]
    while True:
        if _compiled(chain[-1]):
            chain.append(chain[-1]._orig_mod)
        elif isinstance(chain[-1], (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            chain.append(chain[-1].module)
        else:
            return chain


def _compiled(model: nn.Module) -> bool:
    # Without importing torch._dynamo (a second): before it is imported, nothing is compiled.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return eval_frame is not None and isinstance(model, eval_frame.OptimizedModule)


def refuse_unsynchronised_parameters(outer: nn.Module, model: nn.Module, config: Any) -> None:
    """DistributedDataParallel takes the parameters it synchronises when it is built: a method
    that would add some (DynamicViT's predictors, where the model has none yet at a stage) must
    patch the model before it is wrapped. Asked of the config before its reducers are built,
    which may update the model's existing ones: a refused call changes nothing."""
    ddp = any(isinstance(m, nn.parallel.DistributedDataParallel) for m in runtime_chain(outer))
    if ddp and getattr(config, "adds_parameters", lambda model: False)(model):
        raise TypeError(
            "this method adds parameters, which DistributedDataParallel, built before them, would not synchronise: "
            "patch the model first, then wrap it, model = DistributedDataParallel(tokenprune.patch(model, ...), ...)"
        )


def check_method_for(model: nn.Module, config: Any) -> None:
    """Raise a TypeError for a method that the model (its wrappers, its family) cannot run
    exactly, before anything is patched."""
    *wrappers, model = wrapper_chain(model)
    for wrapper in wrappers:
        if wrapper_of(wrapper).reads_every_patch:
            refuse_dropping(config, f"{original_class(wrapper).__name__}'s outputs")
    known = family(model)
    # Methods that merge and unmerge inside every block (merge_unmerge) run where a family has a
    # block for them (takes_unmerging: SAM, plain ViTs).
    if getattr(config, "unmerges_in_blocks", False) and not getattr(known, "takes_unmerging", False):
        raise TypeError(
            f"{type(config).__name__} merges and unmerges inside every block, in SAM and in plain timm "
            f"VisionTransformers; {original_class(model).__name__} is patched with the methods that keep "
            "merged tokens between blocks: use tome"
        )
    known.check_method(model, config)


def check_reducers(model: nn.Module, config: Any, reducers: list[TokenReducer | None]) -> None:
    """Raise a TypeError where a reducer would read an attention map from a block that gives
    only its keys (differential attention, parallel blocks)."""
    for i, (block, reducer) in enumerate(zip(model.blocks, reducers)):
        metric = None if reducer is None or reducer.before_attention else reducer.metric
        # (an attention with its own forward; a block with its own, which says so)
        gives_only_keys = type(getattr(block, "attn", None)) in ATTENTION_FORWARDS or getattr(
            PATCHED_BLOCKS[original_block_class(block)], "gives_only_keys", False
        )
        if metric not in (None, "keys") and gives_only_keys:
            # Name the attention where it is the cause: a plain Block built with attn_layer="diff"
            # gives only keys through its DiffAttention, which "(Block)" alone would not say.
            attn_class = type(getattr(block, "attn", None))
            holder = original_block_class(block).__name__
            if attn_class in ATTENTION_FORWARDS:
                holder += f" with {attn_class.__name__}"
            raise TypeError(
                f"{type(config).__name__} reads the attention map ({metric!r}), but blocks[{i}] "
                f"({holder}) give their reducer only the keys: use a method that "
                "matches on keys (tome, pitome, local_global)"
            )


def original_class(model: nn.Module) -> type:
    """The class the model had before patching."""
    return _ORIGINAL_CLASSES.get(type(model), type(model))


def family(model: nn.Module) -> type[ReducingViT]:
    """The reducing class of the model's family (patched or not): its hooks say how the family
    maps image sizes to grids and what it runs besides the blocks. (SAM's keeps timm's forward
    and is no ReducingViT; it has the same hooks.)"""
    model_class = original_class(model)
    if parametrize.is_parametrized(model) and model_class.__bases__[0] in PATCHED_CLASSES:
        raise TypeError(
            f"tokenprune cannot swap the class of a parametrized {model_class.__bases__[0].__name__} "
            f"({model_class.__name__}, made by torch.nn.utils.parametrize): patch the model first, then "
            "parametrize it"
        )
    if model_class not in PATCHED_CLASSES:
        # A model of the user's own that holds a supported one (a LightningModule, nn.Sequential
        # with a head): name where, since patching that one in place is what works.
        inner = next((name for name, m in model.named_modules() if name and original_class(m) in PATCHED_CLASSES), None)
        held = (
            f"; it holds a {original_class(model.get_submodule(inner)).__name__} at {inner!r}: give that one, e.g. "
            f"tokenprune.patch(model.get_submodule({inner!r}), ...), which patches it in place for this model's forward"
            if inner is not None
            else ""
        )
        raise TypeError(
            f"tokenprune cannot patch {model_class.__module__}.{model_class.__name__}{held}; supported: {SUPPORTED_FAMILIES}"
        )
    return PATCHED_CLASSES[model_class]


def _refuse_image_size(model: nn.Module, size: tuple[int, int]) -> NoReturn:
    expected = tuple(model.patch_embed.img_size)
    # (CaiT and others without dynamic_img_size take one size, set when they are created)
    remedy = "dynamic_img_size=True" if hasattr(model, "dynamic_img_size") else f"img_size={tuple(size)}"
    raise ValueError(
        f"the model takes {expected[0]}x{expected[1]} images, got {size[0]}x{size[1]}; create it with "
        f"{remedy} for other sizes (tokenprune keeps no state between calls)"
    )


def block_prefix_tokens(model: nn.Module) -> int:
    """How many prefix tokens (class, distillation, registers) the blocks see, ahead of the
    patches: ``num_prefix_tokens``, except in CaiT, which adds its class token after them."""
    prefix = getattr(model, "num_prefix_tokens", 0)  # (SAM has none)
    return prefix if family(model)._prefix_in_blocks else 0


def _class_names(classes: Any) -> str:
    # module-qualified: timm's ViT and BEiT both have a ``Block`` and an ``Attention``
    return ", ".join(sorted(f"{c.__module__.rsplit('.', 1)[-1]}.{c.__name__}" for c in classes))


def original_block_class(block: nn.Module) -> type:
    return next((original for original, patched in PATCHED_BLOCKS.items() if type(block) is patched), type(block))


# The patched block runs the attention's parts itself (its projections, norms and dropouts still
# run as modules), never attn.forward: hooks on attn would stop firing.
ATTENTION_HOOKS = (
    "which would stop firing: the patched block computes attention itself, not through attn.forward. "
    "Hook its submodules (attn.qkv, attn.proj, attn.k_norm still run) or the block"
)


# The patched model runs its blocks one by one, never model.blocks(x): hooks on the container
# would stop firing.
_BLOCKS_HOOKS = (
    "which would stop firing: the patched model runs its blocks one by one (each takes and returns the "
    "TokenState it threads through them), never model.blocks(x). Hook the blocks themselves: a forward "
    "pre-hook on model.blocks[0] (args[0].x: the tokens entering the blocks) and a forward hook on "
    "model.blocks[-1] (output.x: the reduced tokens leaving them)"
)


# Over merged tokens the patch runs these modules' maths itself, to count each token by its size
# where their forward takes no such weight: hooks on them would stop firing.
_PROJ_W_HOOKS = (
    "which would stop firing: over merged tokens the patch mixes the heads itself, counting the bias "
    "once per patch a token covers. Hook attn.proj_l or attn.proj (they still run)"
)
_PRR_HOOKS = (
    "which would stop firing: over merged tokens the patch pools itself, counting each token by its size, "
    "which AttentionPoolPrr's forward cannot. Hook attn_pool.pre_norm or attn_pool.post_norm (they still "
    "run), or model.fc_norm (a forward pre-hook sees the pooled features)"
)


def hooks_of(module: nn.Module) -> str:
    """The hooks on ``module`` that fire only when its forward runs: "forward hooks" (and
    pre-hooks), "backward hooks" (``register_full_backward_hook``'s and pre-hooks, which wrap the
    forward's inputs and outputs), "forward and backward hooks", or "" for none."""
    forward = bool(module._forward_hooks or module._forward_pre_hooks)
    backward = bool(module._backward_hooks or module._backward_pre_hooks)
    if forward and backward:
        return "forward and backward hooks"
    return "forward hooks" if forward else "backward hooks" if backward else ""


def _refuse_fx_tracing(x: object) -> None:
    """torch.fx's symbolic tracing (timm's FX feature extraction) cannot follow a patched model,
    whose reductions branch in Python on token counts: say so, and what captures it instead."""
    if isinstance(x, torch.fx.Proxy):
        raise TypeError(
            "torch.fx symbolic tracing cannot follow a patched model (its reductions branch in Python on "
            "token counts); capture it with torch.export or torch.compile, or take features with "
            "forward_intermediates"
        )


def check_block_input(state: object) -> None:
    """Raise a TypeError where a patched block is called on something else than the reducing state
    its model hands it (e.g. a loop of the caller's own over ``model.blocks`` with a tensor)."""
    if not isinstance(state, TokenState):
        raise TypeError(
            f"a patched block takes the TokenState its model passes from block to block, got a "
            f"{type(state).__name__}: run the model (model(x), model.forward_tokens(x) or model.forward_features(x)), "
            "or tokenprune.unpatch(model) to call its blocks on tensors"
        )


def refuse_hooks(module: nn.Module, where: str, why: str, patched: bool) -> None:
    """Raise where ``module`` (named ``where``) has hooks that the patched model would skip
    (``why``: which would stop firing, and what to hook instead): skipping them would lose,
    silently, what they capture or change. A TypeError at patching (:func:`check_supported`), a
    RuntimeError in a patched model's forward (``patched``: hooks put on after patching)."""
    if hooks := hooks_of(module):
        if patched:
            raise RuntimeError(f"{where} has {hooks}, {why}; or remove the hooks (or tokenprune.unpatch)")
        raise TypeError(f"{where} has {hooks}, {why}; or remove the hooks before tokenprune.patch")


def check_supported(model: nn.Module) -> None:
    """Raise a TypeError naming the first module tokenprune cannot patch exactly."""
    known = family(model)  # a family tokenprune knows, or a TypeError naming them
    if getattr(known, "_blocks_called_whole", False):
        refuse_hooks(model.blocks, "model.blocks", _BLOCKS_HOOKS, patched=False)
    if isinstance(getattr(model, "attn_pool", None), AttentionPoolPrr):
        refuse_hooks(model.attn_pool, "model.attn_pool (timm's parameter-free prr pooling)", _PRR_HOOKS, patched=False)
    for i, block in enumerate(model.blocks):
        if original_block_class(block) not in PATCHED_BLOCKS:
            raise TypeError(
                f"tokenprune cannot patch blocks[{i}] of type {type(block).__name__} "
                f"(blocks it can: {_class_names(PATCHED_BLOCKS)}); supported: {SUPPORTED_FAMILIES}"
            )
        attn = getattr(block, "attn", None)  # (parallel blocks hold their attention themselves)
        if attn is not None and type(attn) not in QKV_PROJECTIONS and type(attn) not in ATTENTION_FORWARDS:
            raise TypeError(
                f"tokenprune cannot patch blocks[{i}].attn of type {type(attn).__name__} "
                f"(attentions it can: {_class_names([*QKV_PROJECTIONS, *ATTENTION_FORWARDS])}); "
                f"supported: {SUPPORTED_FAMILIES}"
            )
        if attn is not None:
            refuse_hooks(attn, f"blocks[{i}].attn", ATTENTION_HOOKS, patched=False)
        proj_w = getattr(attn, "proj_w", None)  # (CaiT's talking heads)
        if isinstance(proj_w, nn.Module):
            where = f"blocks[{i}].attn.proj_w (talking heads' mixing of attention weights)"
            refuse_hooks(proj_w, where, _PROJ_W_HOOKS, patched=False)
        # A gMLP gate (mlp_layer=GatedMlp with timm's SpatialGatingUnit) mixes a fixed number of
        # tokens with a seq_len x seq_len linear: after any reduction it failed mid-forward on a
        # bare shape mismatch.
        gate = next((name for name, m in block.named_modules() if isinstance(m, SpatialGatingUnit)), None)
        if gate is not None:
            raise TypeError(
                f"tokenprune cannot patch blocks[{i}].{gate}: timm's SpatialGatingUnit mixes a fixed number of "
                "tokens (seq_len), which reducing tokens changes; build the model with an MLP that works on each "
                "token alone (mlp_layer=Mlp, GluMlp, SwiGLU, or GatedMlp without gate_layer)"
            )
    if len(model.blocks) == 0:
        raise ValueError("the model has no transformer blocks: there is nothing to patch")
    known.check_modules(model)


def check_own_classes(model: nn.Module) -> None:
    """Raise a TypeError, before anything changes, where a class that :func:`apply` set has
    since been replaced by a subclass of it (``torch.nn.utils.parametrize`` makes one for each
    module it parametrizes): swapping classes would keep that subclass, and with it the patched
    forward without its settings."""
    patched = (*PATCHED_CLASSES.values(), *PATCHED_BLOCKS.values())
    for name, module in [("the model", model), *((f"blocks[{i}]", b) for i, b in enumerate(getattr(model, "blocks", ())))]:
        cls = type(module)
        base = next((p for p in patched if cls is not p and issubclass(cls, p)), None)
        if base is not None and parametrize.is_parametrized(module):
            raise TypeError(
                f"{name} is a {cls.__name__}, a subclass made of tokenprune's {base.__name__} after patching "
                "(torch.nn.utils.parametrize makes one): tokenprune cannot swap its class. Remove the "
                "parametrizations first (torch.nn.utils.parametrize.remove_parametrizations), then patch or "
                "unpatch, and parametrize again after"
            )


def apply(model: nn.Module, config: Any, reducers: list[TokenReducer | None]) -> None:
    """Swap the classes in place and give every block its reducer; idempotent."""
    model.__class__ = PATCHED_CLASSES[original_class(model)]
    model.tokenprune_config = config
    _drop_attributes(model, ("_tokenprune_source",))  # a map from the old settings would mislead
    backend = getattr(config, "backend", "auto")
    if backend == "auto":
        backend = model.__class__.auto_backend
    for block, reducer in zip(model.blocks, reducers):
        block.__class__ = PATCHED_BLOCKS[original_block_class(block)]
        block.reducer = reducer
        block.prop_attn = config.prop_attn
        block.backend = backend


def remove(model: nn.Module) -> None:
    """Undo :func:`apply` exactly: original classes, no added attributes."""
    model.__class__ = original_class(model)
    _drop_attributes(model, ("tokenprune_config", "_tokenprune_source"))
    for block in model.blocks:
        block.__class__ = original_block_class(block)
        _drop_attributes(block, ("reducer", "prop_attn", "backend"))


def _drop_attributes(module: nn.Module, names: tuple[str, ...]) -> None:
    for name in names:
        if hasattr(module, name):
            delattr(module, name)
