"""ToMe: Token Merging (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..merge import (
    TokenState,
    bipartite_matching_flops,
    bipartite_soft_matching_members,
    max_bipartite_r,
    merge_state,
    padding_first_matching,
)
from ..schedule import RSchedule, resolve_r
from ..patch.vit import block_prefix_tokens, head_dim
from ._options import check_common_options


@dataclass(frozen=True)
class BipartiteMerge:
    """One block's ToMe step: merge ``r`` tokens by bipartite soft matching.

    ``r`` is capped at half of the mergeable tokens (ToMe's limit); the cap depends on the
    token count, which is static per input shape, so the step stays compile-friendly.
    """

    r: int
    num_protected: int
    backend: str = "auto"
    before_attention = False
    metric = "keys"

    def num_removed(self, num_tokens: int, grid: tuple[int, ...] | None = None) -> int:
        return min(self.r, max_bipartite_r(num_tokens, self.num_protected))

    def matching_flops(self, num_tokens: int, removed: int, attn: nn.Module) -> int:
        return bipartite_matching_flops(num_tokens, self.num_protected, head_dim(attn)) if removed else 0

    def __call__(self, state: TokenState, metric: Tensor) -> TokenState:
        r = self.num_removed(state.num_tokens)
        if r == 0:
            return state
        if state.padded:
            dest = padding_first_matching(metric, state.size[..., 0] == 0, r, self.num_protected, self.backend)
            return merge_state(state, dest, state.num_tokens - r, self.backend)
        members = bipartite_soft_matching_members(metric, r, self.num_protected, self.backend)
        return merge_state(state, members.dest, state.num_tokens - r, self.backend, members)


@dataclass(frozen=True)
class ToMeConfig:
    """Merge ``r`` tokens per block by bipartite soft matching on the attention keys.

    Args:
        r: tokens removed per block: an int, ``(r, inflection)`` (ToMe's linear schedule;
            ``(r, -1)`` is the paper's "decreasing schedule") or a per-block list. Each block
            removes at most half of its mergeable tokens; read the effective counts back with
            ``tokenprune.plan(model, input_size)``.
        prop_attn: proportional attention (add log(size) to the attention logits, ToMe Eq. 1).
            Keep it on for models trained without ToMe; ToMe turns it off for MAE models.
        trace_source: record which input patches each output token covers, readable after a
            forward with ``tokenprune.source(model)``. For visualisation; costs one gather per
            block and stores the map on the model.
        backend: where matching and merging run: "auto" (Triton kernels for CUDA tensors when
            triton imports, PyTorch otherwise), "triton" or "torch" to force one.
    """

    r: RSchedule
    prop_attn: bool = True
    trace_source: bool = False
    backend: str = "auto"

    def __post_init__(self) -> None:
        check_common_options(self)

    track_positions = False  # ToMe matches on features alone
    supports_video = True  # joint space-time merging (ToMe's video setting)
    supports_padding = True  # NaFlexVit's packed sequences (TokenState.padded)

    def reducers(self, model: nn.Module) -> list[BipartiteMerge | None]:
        counts = resolve_r(self.r, len(model.blocks))
        protected = block_prefix_tokens(model)
        return [BipartiteMerge(n, protected, self.backend) if n > 0 else None for n in counts]
