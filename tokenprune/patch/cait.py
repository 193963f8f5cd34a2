"""Patch for timm's ``Cait`` (CaiT: Touvron et al., "Going deeper with Image Transformers",
ICCV 2021): self-attention blocks over the patches alone, with talking-heads attention and
LayerScale, then a few class-attention blocks in which only the class token, added there,
attends to the patches.

Merging runs in the self-attention blocks, so nothing needs protecting there. Talking heads
(:func:`tokenprune.patch.vit.attend`) take log s after mixing the logits and count their
post-softmax bias once per patch a key stands for. The class-attention blocks are CaiT's
pooling: the class token attends to each merged token with log s added to its logit, always (as
average and MAP pooling weigh by size whatever ``prop_attn`` says), which equals its attention
to the unmerged patches when merged tokens are exact copies. The class token then joins the
tokens in front, so ``forward_features`` keeps timm's [B, 1 + T, C] and the source map covers
the class token as input token 0.

Importing this module registers the classes in :mod:`tokenprune.patch.vit`'s registries.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from timm.models.cait import Cait, ClassAttn, LayerScaleBlock, LayerScaleBlockClassAttn, TalkingHeadAttn
from torch import Tensor, nn

from ..merge import TokenState, prepend_tokens
from . import vit
from .vit import ReducingBlockMixin, ReducingViT, head_dim, linear_flops, pooling_key_bias


class CaitSteps:
    """Residual steps of CaiT's ``LayerScaleBlock``: pre-norm, ``gamma_1``/``gamma_2``
    LayerScale, one drop-path for both branches."""

    def _attention_input(self, x: Tensor) -> Tensor:
        return self.norm1(x)

    def _add_attention(self, x: Tensor, attn_out: Tensor) -> Tensor:
        return x + self.drop_path(self.gamma_1 * attn_out)

    def _add_mlp(self, x: Tensor, mlp: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        return x + self.drop_path(self.gamma_2 * (self.mlp if mlp is None else mlp)(self.norm2(x)))


class ReducingLayerScaleBlock(CaitSteps, ReducingBlockMixin, LayerScaleBlock):
    """timm CaiT ``LayerScaleBlock`` (talking-heads attention) with token reduction."""


def _talking_heads_qkv(attn: TalkingHeadAttn, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    batch, num_tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, num_tokens, 3, attn.num_heads, head_dim(attn)).permute(2, 0, 3, 1, 4)
    return qkv.unbind(0)


# Once tokens are merged (or a training keep mask drops some), class_attention runs the block's
# parts itself, never block.forward or attn.forward: hooks on them (CaiT's class-attention maps)
# would stop firing.
_CLASS_ATTENTION_HOOKS = (
    "which would stop firing: the patched model runs CaiT's class attention itself, to count each merged token "
    "by its size, not through its forward. Hook its submodules (attn.q, attn.k, attn.v, attn.proj, mlp still run)"
)


def refuse_class_attention_hooks(block: LayerScaleBlockClassAttn, name: str, patched: bool) -> None:
    """:func:`~tokenprune.patch.vit.refuse_hooks` for a class-attention block and its ``attn``."""
    for module, part in ((block, ""), (block.attn, ".attn")):
        vit.refuse_hooks(module, f"{name}{part}", _CLASS_ATTENTION_HOOKS, patched)


def class_attention(block: LayerScaleBlockClassAttn, x: Tensor, cls: Tensor, weights: Tensor | None) -> Tensor:
    """One class-attention block: the class token ``cls`` ([B, 1, C]) attends to itself and to
    the tokens ``x``, each counted ``weights`` times ([B, T, 1]: sizes, or a training keep mask;
    None: once, timm's own forward)."""
    if weights is None:
        return block(x, cls)
    u = block.norm1(torch.cat((cls, x), dim=1))
    attn: ClassAttn = block.attn
    batch, num_tokens, channels = u.shape

    def heads(t: Tensor) -> Tensor:  # (t.shape[1], not -1: a batch of 0 leaves it ambiguous)
        return t.reshape(batch, t.shape[1], attn.num_heads, channels // attn.num_heads).transpose(1, 2)

    q, k, v = heads(attn.q(u[:, :1])), heads(attn.k(u)), heads(attn.v(u))
    counted = torch.cat([torch.ones_like(weights[:, :1]), weights], dim=1)
    bias = pooling_key_bias(counted, padded=False, dtype=u.dtype)[:, None, None, :]
    dropout = attn.attn_drop.p if attn.training else 0.0
    # A dropped key keeps ~1e-9 of its weight, below float16's range, where its gradient would
    # round to zero: float16 takes the softmax in float32, as the blocks' masked attention does.
    float32_softmax = q.dtype == torch.float16
    if attn.fused_attn and not float32_softmax:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout)
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        probs = (logits.float() + bias).softmax(dim=-1) if float32_softmax else (logits + bias.to(q.dtype)).softmax(dim=-1)
        out = attn.attn_drop(probs.to(v.dtype)) @ v
    out = attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(batch, 1, channels)))
    cls = cls + block.drop_path(block.gamma_1 * out)
    return cls + block.drop_path(block.gamma_2 * block.mlp(block.norm2(cls)))


def class_attention_flops(model: Cait, tokens: int) -> int:
    """FLOPs of CaiT's class-attention blocks on ``tokens`` tokens (the class token included),
    per image; for :func:`tokenprune.flops`."""
    total = 0
    for block in model.blocks_token_only or ():
        attn = block.attn
        linear_rows = {attn.q: 1, attn.k: tokens, attn.v: tokens, attn.proj: 1}
        total += sum(linear_flops(rows, layer) for layer, rows in linear_rows.items())
        total += 4 * tokens * attn.q.out_features  # the one query's q·kᵀ and attn·v
        total += sum(linear_flops(1, layer) for layer in block.mlp.modules() if isinstance(layer, nn.Linear))
    return total


class ReducingCait(ReducingViT, Cait):
    """timm ``Cait`` with token reduction in its self-attention blocks; the class-attention
    blocks pool the merged tokens by size."""

    _prefix_in_blocks = False
    _blocks_called_whole = True  # (timm's forward_features: self.blocks(x))

    @staticmethod
    def check_modules(model: nn.Module) -> None:
        for i, block in enumerate(model.blocks_token_only or ()):
            if type(block) is not LayerScaleBlockClassAttn or type(block.attn) is not ClassAttn:
                raise TypeError(
                    f"tokenprune cannot patch blocks_token_only[{i}] of type {type(block).__name__} "
                    f"with attention {type(block.attn).__name__}: it runs CaiT's LayerScaleBlockClassAttn with ClassAttn"
                )
            refuse_class_attention_hooks(block, f"blocks_token_only[{i}]", patched=False)

    @staticmethod
    def after_blocks_flops(model: nn.Module, tokens: int, grid: tuple[int, ...]) -> int:
        return class_attention_flops(model, tokens)

    def _embed(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        x = self.patch_embed(x)
        return self.pos_drop(x + self.pos_embed), None

    def forward_intermediates(  # type: ignore[override]
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        **more: Any,
    ) -> Any:
        """timm Cait's argument order (no ``return_prefix_tokens`` among the positional ones);
        the shared options (``output_dict``, ...) by keyword."""
        return super().forward_intermediates(
            x, indices, norm=norm, stop_early=stop_early, output_fmt=output_fmt,
            intermediates_only=intermediates_only, **more,
        )  # fmt: skip

    def _after_blocks(self, state: TokenState) -> TokenState:
        if self.blocks_token_only is not None:  # (None after timm's prune_intermediate_layers)
            cls = self.cls_token.expand(state.x.shape[0], -1, -1)
            for i, block in enumerate(self.blocks_token_only):
                if state.pool_weights is not None:  # (put on after patching: check_modules refuses them before)
                    refuse_class_attention_hooks(block, f"blocks_token_only[{i}]", patched=True)
                cls = class_attention(block, state.x, cls, state.pool_weights)
            state = prepend_tokens(state, cls)
        return state._replace(x=self.norm(state.x))


vit.QKV_PROJECTIONS[TalkingHeadAttn] = _talking_heads_qkv
vit.PATCHED_BLOCKS[LayerScaleBlock] = ReducingLayerScaleBlock
vit.register_model_class(Cait, ReducingCait)
