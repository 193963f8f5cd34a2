"""Token bookkeeping shared by every reduction method, and ToMe's bipartite matching.

Every merging method in tokenprune is expressed the same way: a *matching* step produces
``dest`` ([B, T] int64), the index that each of the T current tokens moves to among the
``T_out`` tokens of the next layer; one *merge* step then averages the tokens that share a
destination, weighted by their sizes (ToMe, Bolya et al. 2023, Sec. 3: x* = Σ s·x / Σ s).
The two hot steps (best match, weighted merge) are in ``kernels/``, Triton + PyTorch reference.
Source tracing, unmerging for dense outputs and FLOP accounting all follow from ``dest``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from kernels import best_match, merge_wavg


class TokenState(NamedTuple):
    """What flows from block to block in a reduced model.

    x: [B, T, C] tokens; the first ``num_prefix_tokens`` are class/distillation/register tokens.
    size: [B, T, 1] float32, how many input tokens each token stands for; ``None`` until the
        first merge (all ones), so an unreduced model runs the exact ops of the unpatched one.
    source_index: [B, T_in] int64, for every input token the index of the current token that
        holds it; ``None`` unless source tracing is on.
    """

    x: Tensor
    size: Tensor | None = None
    source_index: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.x.shape[1]

    def sizes(self) -> Tensor:
        """Token sizes, materialising the implicit all-ones size."""
        if self.size is not None:
            return self.size
        return self.x.new_ones(self.x.shape[0], self.x.shape[1], 1, dtype=torch.float32)


def start_state(x: Tensor, trace_source: bool) -> TokenState:
    """The state entering the first block: every token has size 1 and is its own source."""
    source_index = None
    if trace_source:
        source_index = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    return TokenState(x, None, source_index)


def merge_state(state: TokenState, dest: Tensor, num_out: int, backend: str = "auto") -> TokenState:
    """Apply one matching (``dest``) to every field of the state: tokens become size-weighted
    averages (ToMe: x ← Σ s·x / Σ s, :func:`kernels.merge_wavg`), sizes add up, sources follow."""
    x, size = merge_wavg(state.x, state.sizes(), dest, num_out, backend)
    source_index = state.source_index
    if source_index is not None:
        source_index = dest.gather(1, source_index)
    return TokenState(x, size, source_index)


def unmerge(x: Tensor, source_index: Tensor) -> Tensor:
    """Restore one token per input token: input token i receives the feature of the token that
    absorbed it. [B, T, C] × [B, T_in] → [B, T_in, C]."""
    return x.gather(1, source_index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def source_matrix(source_index: Tensor, num_tokens: int) -> Tensor:
    """Dense [B, T, T_in] 0/1 map from current tokens to the input tokens they cover (ToMe's
    ``source``)."""
    return torch.nn.functional.one_hot(source_index, num_tokens).transpose(1, 2)


def max_bipartite_r(num_tokens: int, num_protected: int) -> int:
    """ToMe merges at most half of the mergeable tokens per layer (one side of the bipartition)."""
    return max(num_tokens - num_protected, 0) // 2


def bipartite_soft_matching(metric: Tensor, r: int, num_protected: int, backend: str = "auto") -> Tensor:
    """ToMe's bipartite soft matching (Bolya et al. 2023, Sec. 3.2), returned as ``dest``.

    1. Alternate the tokens into sets A (even positions) and B (odd positions).
    2. Score every A–B pair by cosine similarity of ``metric`` (keys averaged over heads).
    3. Keep each A token's most similar B token (ties: the lowest B index).
    4. Merge the r A tokens with the highest best-match score into their B partner
       (ties: the lowest A index).

    The ``num_protected`` prefix tokens are never merged, into or from (ToMe gives their rows
    and columns a score of −inf; excluding them is the same matching). The output order is:
    prefix tokens, unmerged A tokens, then B tokens, each in their original order. With one
    prefix token (a class token) this is exactly ToMe's order.

    Args:
        metric: [B, T, D] matching features. r: tokens to remove, ≤ max_bipartite_r(T, P).
        num_protected: P, the count of leading tokens that must survive unchanged.
        backend: where step 2-3 runs, see :func:`kernels.best_match`.
    Returns:
        dest: [B, T] int64, the index of each token in the merged sequence of T - r tokens.
    """
    batch, num_tokens, _ = metric.shape
    p = num_protected
    if not 0 <= r <= max_bipartite_r(num_tokens, p):
        raise ValueError(f"r={r} is outside [0, {max_bipartite_r(num_tokens, p)}] for {num_tokens} tokens")
    device = metric.device
    # A/B parity follows the absolute position, as in ToMe, so prefix tokens do not shift it.
    a_start, b_start = p % 2, 1 - p % 2
    # Similarities in float32 whatever the model's dtype: bf16 would round distinct
    # similarities into ties and change which tokens merge.
    body = metric[:, p:].float()
    body = body / body.norm(dim=-1, keepdim=True)
    a, b = body[:, a_start::2], body[:, b_start::2]
    num_a, num_b = a.shape[1], b.shape[1]

    best_score, best_b = best_match(a, b, backend)
    order = best_score.argsort(dim=-1, descending=True, stable=True)
    is_src = torch.zeros(batch, num_a, dtype=torch.bool, device=device)
    is_src.scatter_(1, order[:, :r], True)

    num_unmerged = num_a - r
    b_base = p + num_unmerged
    unmerged_rank = (~is_src).cumsum(dim=1) - 1
    dest_a = torch.where(is_src, b_base + best_b, p + unmerged_rank)
    dest_b = (b_base + torch.arange(num_b, device=device)).expand(batch, -1)

    dest = torch.empty(batch, num_tokens, dtype=torch.long, device=device)
    dest[:, :p] = torch.arange(p, device=device)
    dest[:, p + a_start :: 2] = dest_a
    dest[:, p + b_start :: 2] = dest_b
    return dest
