"""DynamicViT: learned token dropping (Rao et al., "DynamicViT: Efficient Vision Transformers
with Dynamic Token Sparsification", NeurIPS 2021).

A light prediction module before a few blocks scores every patch token; training keeps all
tokens in place and masks the dropped ones out of attention with straight-through Gumbel-softmax
decisions (Sec. 3.3), inference keeps the top-scoring tokens (Sec. 3.4). Stage s keeps ρ^s of
the input patch tokens; prefix tokens are always kept.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._io import write_atomic
from ..merge import TokenState, keep_top_tokens
from ..patch.vit import block_prefix_tokens, linear_flops, reducing_model, runtime_chain
from ._options import check_common_options, check_keep_ratio, check_stage_blocks, check_stages


def default_stages(depth: int) -> tuple[int, ...]:
    """Blocks before which predictors run: DeiT's (3, 6, 9) for 12 blocks, scaled for others
    (within blocks 1 … depth − 1)."""
    return tuple(sorted({min(depth - 1, max(1, round(depth * k / 4))) for k in (1, 2, 3)}))


def kept_count(grid: tuple[int, int], keep_fraction: float) -> int:
    """Patch tokens kept at a stage: ⌊ρ^s · patches⌋, at least one (DynamicViT rounds down)."""
    return max(1, int(grid[0] * grid[1] * keep_fraction))


class TokenPredictor(nn.Module):
    """DynamicViT's prediction module (Sec. 3.2): local and global features → keep/drop.

    z = GELU(Linear(LN(x))); z_local = z[:, :C/2] per token, z_global = mean of z[:, C/2:] over
    the tokens still kept; π = LogSoftmax(MLP([z_local, z_global])) (Eq. 3-5): [B, N, 2], π[..., 0]
    the log-probability of keeping the token.
    """

    before_attention = True
    metric = None

    def __init__(self, dim: int, keep_fraction: float, num_protected: int) -> None:
        super().__init__()
        self.keep_fraction = keep_fraction  # ρ^s: of the input patch tokens, how many stay
        self.num_protected = num_protected
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(), nn.Linear(dim // 4, 2)
        )

    def log_probs(self, x: Tensor, keep: Tensor) -> Tensor:
        """[B, N, 2] log-probabilities (keep, drop) of the non-prefix tokens ``x`` ([B, N, C]),
        ``keep`` ([B, N, 1]) the tokens still in play."""
        z = self.in_conv(x)
        local, global_ = z.chunk(2, dim=-1)
        # Mean over the kept tokens; an image whose tokens were all dropped (a few-patch model
        # can draw that while training) gets a zero global feature instead of 0/0 = NaN.
        global_ = (global_ * keep).sum(dim=1, keepdim=True) / keep.sum(dim=1, keepdim=True).clamp(min=1.0)
        return F.log_softmax(self.out_conv(torch.cat([local, global_.expand_as(local)], dim=-1)), dim=-1)

    def num_removed(self, num_tokens: int, grid: tuple[int, int]) -> int:
        return num_tokens - self.num_protected - kept_count(grid, self.keep_fraction)

    def matching_flops(self, num_tokens: int, removed: int, attn: nn.Module) -> int:
        if removed <= 0:
            return 0  # the inference forward skips a stage that keeps every token
        patches = num_tokens - self.num_protected
        linears = [self.in_conv[1], self.out_conv[0], self.out_conv[2], self.out_conv[4]]
        return sum(linear_flops(patches, layer) for layer in linears)

    def forward(self, state: TokenState, metric: Tensor | None = None) -> TokenState:
        p = self.num_protected
        x = state.x[:, p:]
        if not self.training:
            kept = kept_count(state.grid, self.keep_fraction)
            if kept >= state.num_tokens - p:
                return state  # nothing to drop: the tokens stay as they are, bit for bit
            scores = self.log_probs(x, torch.ones_like(x[..., :1]))[..., 0]
            return keep_top_tokens(state, scores, kept, p)
        previous = state.keep[:, p:] if state.keep is not None else torch.ones_like(x[..., :1])
        log_probs = self.log_probs(x, previous)
        # Straight-through Gumbel-softmax: hard 0/1 forward, soft gradient; once dropped,
        # a token stays dropped (Eq. 6: D ← D ⊙ D̂).
        decision = F.gumbel_softmax(log_probs, hard=True)[..., :1] * previous
        keep = torch.cat([torch.ones_like(state.x[:, :p, :1]), decision], dim=1)
        return state._replace(keep=keep, decisions=state.decisions + (decision,))


@dataclass(frozen=True)
class DynamicViTConfig:
    """Learned token dropping with DynamicViT prediction modules.

    Args:
        keep_ratio: ρ; before stage s the model keeps ρ^s of the input patch tokens (0.7).
        stages: blocks before which predictors run (default: DeiT's 3, 6, 9, scaled to the
            depth).
        predictor: a safetensors file of trained predictor weights (from
            ``evals/train_dynamicvit.py`` or :func:`save_predictors`) to load into the model.
        trace_source: as in :class:`~tokenprune.ToMeConfig` (dropped patches map to no token).

    Re-patching with another ``keep_ratio`` keeps the predictors' weights.
    """

    keep_ratio: float = 0.7
    stages: tuple[int, ...] | None = None
    predictor: str | Path | None = None
    trace_source: bool = False
    prop_attn = False  # tokens are dropped, never merged: sizes stay 1
    track_positions = False
    drops_tokens = True
    masks_in_training = True  # in train() dropped tokens stay, masked (TokenState.keep): the head needs the mask

    def __post_init__(self) -> None:
        check_common_options(self)
        check_keep_ratio(self.keep_ratio)
        object.__setattr__(self, "stages", check_stages(self.stages))
        if self.predictor is not None and not isinstance(self.predictor, (str, os.PathLike)):
            raise TypeError(
                f"predictor must be the path (a str or Path) of a safetensors file of predictor weights, or None "
                f"for new predictors; got {self.predictor!r} ({type(self.predictor).__name__})"
            )

    def stage_blocks(self, depth: int) -> tuple[int, ...]:
        return check_stage_blocks(self.stages if self.stages is not None else default_stages(depth), depth, first=1)

    def adds_parameters(self, model: nn.Module) -> bool:
        """Whether :meth:`reducers` would create predictors: at a stage without one already."""
        return any(_predictor_of(model.blocks[block]) is None for block in self.stage_blocks(len(model.blocks)))

    def reducers(self, model: nn.Module) -> list[TokenPredictor | None]:
        depth = len(model.blocks)
        reducers: list[TokenPredictor | None] = [None] * depth
        reference = next(model.parameters())
        created: list[int] = []
        stages = self.stage_blocks(depth)
        for block in stages:
            predictor = _predictor_of(model.blocks[block])
            if predictor is None:
                predictor = TokenPredictor(model.embed_dim, 0.0, block_prefix_tokens(model))
                predictor.to(device=reference.device, dtype=reference.dtype).train(model.training)
                created.append(block)
            reducers[block] = predictor
        # The file is read into every predictor when it is new to the model, else into the
        # predictors just created alone: re-patching with another keep_ratio or stages carries
        # `predictor` over and must not undo training since.
        current = getattr(model, "tokenprune_config", None)
        loaded = isinstance(current, DynamicViTConfig) and current.predictor == self.predictor
        if self.predictor is not None and (created or not loaded):
            load_predictors_into(reducers, self.predictor, blocks=created if loaded else None)
        # Last, so that a file that fails to load leaves the model's predictors as they were.
        for stage, block in enumerate(stages, 1):
            reducers[block].keep_fraction = self.keep_ratio**stage
        return reducers


def _predictor_of(block: nn.Module) -> TokenPredictor | None:
    reducer = getattr(block, "reducer", None)
    return reducer if isinstance(reducer, TokenPredictor) else None


def predictors(model: nn.Module) -> nn.ModuleDict:
    """The model's prediction modules by block index (a view: training these trains the model's).
    ``model`` may be inside the wrappers :func:`tokenprune.patch` sees through (torch.compile,
    DataParallel, DistributedDataParallel, which DynamicViT is patched before), as plans and
    FLOPs are: the predictors are those of the model they hold."""
    blocks = reducing_model(model).blocks
    return nn.ModuleDict({str(i): predictor for i, block in enumerate(blocks) if (predictor := _predictor_of(block)) is not None})


def save_predictors(model: nn.Module, path: str | Path) -> None:
    """Write the predictor weights (only) to a safetensors file, atomically: a run stopped
    mid-write leaves the previous file, never half of one."""
    from safetensors.torch import save

    if not predictors(model):
        raise ValueError("the model has no DynamicViT predictors to save: patch it with method 'dynamicvit' first")
    state = {k: v.detach().cpu().contiguous() for k, v in predictors(model).state_dict().items()}
    write_atomic(path, save(state, metadata={"format": "tokenprune.dynamicvit", "blocks": ",".join(predictors(model).keys())}))


def load_predictors_into(
    reducers: list[TokenPredictor | None], path: str | Path, blocks: Collection[int] | None = None
) -> None:
    """Load a :func:`save_predictors` file into ``reducers``' predictors, all or nothing: a file
    whose tensors do not fit them (names or shapes) raises before any weight is written.
    ``blocks``: into those stages' predictors alone (the file may hold others too)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    modules = nn.ModuleDict({str(i): r for i, r in enumerate(reducers) if r is not None and (blocks is None or i in blocks)})
    try:
        state = load_file(str(path))
    except SafetensorError as error:  # its words name no file
        raise ValueError(f"{path} is no readable safetensors file of predictor weights ({error})") from None
    if holds_predictors(state):
        raise ValueError(
            f"{path} holds a whole patched model's weights (as train_dynamicvit's model.safetensors), not "
            "predictors alone: patch with method 'dynamicvit' and the same stages first, then "
            "model.load_state_dict(safetensors.torch.load_file(path))"
        )
    expected = modules.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected)) if blocks is None else []
    if missing or unexpected:
        # Keys are "<block>.<layer>...": name the stages the file was trained for, which the
        # patch must be given (patching does not take them from the file).
        saved = tuple(sorted({int(key.split(".", 1)[0]) for key in state if key.split(".", 1)[0].isdigit()}))
        fix = (
            f"patch with stages={saved} (and the keep_ratio they were trained with)"
            if saved and 1 <= saved[0] and saved[-1] < len(reducers)
            else f"they were trained for another model than this {len(reducers)}-block one"
        )
        raise ValueError(
            f"predictor weights in {path} do not fit the model's stages {list(modules.keys())}: the file holds "
            f"predictors for stages {saved}, so {fix}; missing {_some(missing)}, unexpected {_some(unexpected)}"
        )
    if misshapen := [f"{k}: {tuple(state[k].shape)} for {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]:
        raise ValueError(f"predictor weights in {path} do not fit the model's width: {misshapen}")
    modules.load_state_dict({key: state[key] for key in expected})


def holds_predictors(state: Mapping[str, Tensor]) -> bool:
    """Whether a state dict was saved from a whole model patched with DynamicViT (``train_dynamicvit
    --train-backbone`` writes the backbone and its predictors together), not from predictors alone."""
    return any(".reducer." in key for key in state)


def _some(keys: list[str], shown: int = 6) -> str:
    """At most ``shown`` names of a key list, and how many more (a mismatched file can have hundreds)."""
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return f"{keys[:shown]}{more}"


class DynamicViTOutput(NamedTuple):
    """What training needs from one forward: logits, the final patch tokens (after the final
    norm) and every stage's keep decisions ([B, N, 1] each)."""

    logits: Tensor
    tokens: Tensor
    decisions: tuple[Tensor, ...]


def forward_train(model: nn.Module, x: Tensor) -> DynamicViTOutput:
    """A training forward of a DynamicViT-patched model (call ``model.train()`` first)."""
    stages = predictors(model).values()
    if not stages:
        raise ValueError("forward_train needs a model patched with method 'dynamicvit'")
    if any(isinstance(m, (nn.DataParallel, nn.parallel.DistributedDataParallel)) for m in runtime_chain(model)):
        # It calls the model's own forward_tokens and head, past the wrapper's forward: no
        # scatter over devices, and no gradient synchronisation under DDP.
        raise ValueError(
            "forward_train runs the model's own forward, past data parallelism's: wrap a module whose forward "
            "calls forward_train(model.module, x) instead (as evals.train_dynamicvit's TrainStep does), or call it "
            "on model.module outside data parallelism"
        )
    if not any(predictor.training for predictor in stages):
        raise ValueError(
            "forward_train needs the predictors in training mode, which keep every token and return their keep "
            "decisions: call model.train() (or predictors(model).train() for a frozen backbone) first"
        )
    state = model.forward_tokens(x)
    logits = model._forward_head_sized(state.x, state.pool_weights, pre_logits=False)
    return DynamicViTOutput(logits, state.x[:, model.num_prefix_tokens :], state.decisions)


class DynamicViTLoss(nn.Module):
    """DynamicViT's objective (Sec. 3.5): cross-entropy + keep-ratio MSE to the targets ρ^s +
    KL distillation from the unpruned teacher's logits + distillation of the kept tokens.

    L = w_cls·CE_ε(y, ŷ) + w_ratio·(1/S)Σ_s (mean(D_s) − ρ^s)² + w_kl·KL(teacher ‖ student)
        + w_token·MSE(kept student tokens, teacher tokens)

    Defaults are DynamicViT's (ratio 2.0, KL 0.5, token 0.5); ``label_smoothing`` ε applies to
    the cross-entropy term only (DeiT's recipe, which DynamicViT trains with, uses 0.1).
    """

    def __init__(
        self,
        keep_ratio: float = 0.7,
        cls_weight: float = 1.0,
        ratio_weight: float = 2.0,
        distill_weight: float = 0.5,
        token_weight: float = 0.5,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        check_keep_ratio(keep_ratio, " (the model's DynamicViTConfig.keep_ratio)")
        self.keep_ratio = keep_ratio
        self.label_smoothing = label_smoothing
        self.cls_weight, self.ratio_weight = cls_weight, ratio_weight
        self.distill_weight, self.token_weight = distill_weight, token_weight

    def forward(
        self, output: DynamicViTOutput, labels: Tensor, teacher_logits: Tensor, teacher_tokens: Tensor
    ) -> dict[str, Tensor]:
        if teacher_tokens.shape != output.tokens.shape:
            raise ValueError(
                f"teacher_tokens must be the teacher's patch tokens, shaped as the student's {tuple(output.tokens.shape)}; "
                f"got {tuple(teacher_tokens.shape)} (leave out the prefix tokens: "
                "teacher.forward_features(x)[:, teacher.num_prefix_tokens:])"
            )
        cls = F.cross_entropy(output.logits, labels, label_smoothing=self.label_smoothing)
        ratio = sum(
            ((d.squeeze(-1).mean(dim=1) - self.keep_ratio ** (s + 1)) ** 2).mean() for s, d in enumerate(output.decisions)
        ) / max(len(output.decisions), 1)
        distill = F.kl_div(
            F.log_softmax(output.logits, dim=-1), F.log_softmax(teacher_logits, dim=-1), reduction="batchmean", log_target=True
        )
        kept = output.decisions[-1].squeeze(-1) > 0.5 if output.decisions else torch.ones_like(output.tokens[..., 0], dtype=torch.bool)
        token = F.mse_loss(output.tokens[kept], teacher_tokens[kept]) if kept.any() else output.tokens.sum() * 0
        total = self.cls_weight * cls + self.ratio_weight * ratio + self.distill_weight * distill + self.token_weight * token
        return {"loss": total, "cls": cls, "ratio": ratio, "distill": distill, "token": token}


__all__ = [
    "DynamicViTConfig",
    "DynamicViTLoss",
    "DynamicViTOutput",
    "TokenPredictor",
    "forward_train",
    "holds_predictors",
    "predictors",
    "save_predictors",
]
