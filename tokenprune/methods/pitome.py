"""PiToMe: protect informative tokens before merging (Tran et al., "Accelerating Transformers
with Spectrum-Preserving Token Merging", NeurIPS 2024).

ToMe's bipartition is by position, so a small object's tokens (unlike anything else in the
image) can be paired with, and merged into, whatever B token is least unlike them. PiToMe
first scores each token by its *energy*, how similar it is to all the others (the mean of
ELU_α(cos − m), the released code's form of the paper's Eq. 4): tokens of a large uniform
region (background) have high energy, isolated tokens low energy. Only the 2r highest-energy
tokens may merge; they are split alternately (in energy order) into A and B, and every A token
merges into its most similar B token. The other tokens are protected and pass through unchanged.

Measured on DINOv2 ViT-S/14 with real weights, it keeps outputs less close to the unreduced
model than ToMe at every budget (``evals/results/dense_fidelity_pitome.md``): confined to the
2r highest-energy tokens, the merges find poorer partners than ToMe's best r pairs.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.match import float32_matmul

from ..merge import TokenState, max_bipartite_r, merge_state, unit_vectors
from ..patch.vit import block_prefix_tokens, head_dim
from ..schedule import RSchedule, resolve_r
from ._options import check_common_options


def energy_scores(unit: Tensor, margin: float, alpha: float) -> tuple[Tensor, Tensor]:
    """PiToMe's energy of each token and the cosine similarities it comes from.

    E_i = 1/N Σ_j ELU_α(cos(u_i, u_j) − m): a pair more similar than the margin m adds its
    excess over m; a less similar pair subtracts, at most α (α(e^(cos − m) − 1) > −α). The sum
    runs over all N tokens, the token itself included (as the released code does; a constant
    for every token).

    Args:
        unit: [B, N, D] unit vectors (see :func:`tokenprune.merge.unit_vectors`).
    Returns:
        (energy [B, N], similarity [B, N, N]), float32 like ``unit``.
    """
    # float32 under autocast too: bf16 would round energies and similarities into ties and
    # change which tokens merge (and, through the energy ranking, which are protected)
    similarity = float32_matmul(unit, unit.transpose(-1, -2))
    return F.elu(similarity - margin, alpha=alpha).mean(dim=-1), similarity


def energy_matching(metric: Tensor, r: int, num_protected: int, margin: float, alpha: float = 1.0) -> Tensor:
    """PiToMe's matching, returned as ``dest`` (see :mod:`tokenprune.merge`).

    1. Score every non-prefix token by :func:`energy_scores` on ``metric``.
    2. Order them by energy, highest first (ties: the lower index first); the first 2r are
       the merge candidates, the rest pass through unmerged.
    3. Alternate the candidates into A (1st, 3rd, ...) and B (2nd, 4th, ...); each of the r
       A tokens merges into its most similar B token (ties: the higher-energy B token).

    The output keeps every surviving token (prefix, protected, B) in its original order.

    Args:
        metric: [B, T, D] matching features (keys averaged over heads). r: tokens to remove,
            1 ≤ r ≤ (T - P) // 2.
        num_protected: P, the prefix tokens (class, registers), never merged.
    Returns:
        dest: [B, T] int64, each token's index among the T - r merged tokens.
    """
    p = num_protected
    batch, device = metric.shape[0], metric.device
    cap = max_bipartite_r(metric.shape[1], p)
    if not 1 <= r <= cap:
        raise ValueError(f"r must be in [1, {cap}] for {metric.shape[1]} tokens with {p} prefix tokens, got {r}")
    energy, similarity = energy_scores(unit_vectors(metric[:, p:]), margin, alpha)
    order = energy.argsort(dim=1, descending=True, stable=True)
    a_index, b_index = order[:, 0 : 2 * r : 2], order[:, 1 : 2 * r : 2]
    a_rows = similarity.gather(1, a_index.unsqueeze(-1).expand(-1, -1, similarity.shape[-1]))
    a_to_b = a_rows.gather(2, b_index.unsqueeze(1).expand(-1, r, -1))  # [B, r, r]
    partner = b_index.gather(1, a_to_b.argmax(dim=-1))  # argmax: the first (highest-energy) of ties
    merged = torch.zeros_like(energy, dtype=torch.bool).scatter_(1, a_index, 1)  # (1: torch.jit.trace cannot type True)
    slot = (~merged).cumsum(dim=1) - 1  # survivors keep their order
    slot = slot.scatter(1, a_index, slot.gather(1, partner))
    prefix = torch.arange(p, device=device).expand(batch, -1)
    return torch.cat([prefix, slot + p], dim=1)


def energy_matching_flops(num_tokens: int, num_protected: int, dim: int) -> int:
    """FLOPs of the all-pairs cosine similarity behind the energy scores."""
    mergeable = num_tokens - num_protected
    return 2 * mergeable * mergeable * dim


@dataclass(frozen=True)
class EnergyMerge:
    """One block's PiToMe step: merge ``r`` of the highest-energy tokens, protect the rest.

    ``r`` is capped at half of the mergeable tokens (2r candidates must exist), a static count.
    """

    r: int
    num_protected: int
    margin: float
    alpha: float = 1.0
    backend: str = "auto"
    before_attention = False
    metric = "keys"

    def num_removed(self, num_tokens: int, grid: tuple[int, ...] | None = None) -> int:
        return min(self.r, max_bipartite_r(num_tokens, self.num_protected))

    def matching_flops(self, num_tokens: int, removed: int, attn: nn.Module) -> int:
        return energy_matching_flops(num_tokens, self.num_protected, head_dim(attn)) if removed else 0

    def __call__(self, state: TokenState, metric: Tensor) -> TokenState:
        r = self.num_removed(state.num_tokens)
        if r == 0:
            return state
        dest = energy_matching(metric, r, self.num_protected, self.margin, self.alpha)
        return merge_state(state, dest, state.num_tokens - r, self.backend)


def default_margins(depth: int) -> tuple[float, ...]:
    """The margin per block of PiToMe's released ViT configuration, m_l = 0.9 − 0.8·l/L: strict
    in the first blocks, where most tokens are alike, looser as tokens grow apart."""
    return tuple(0.9 - 0.8 * block / depth for block in range(depth))


@dataclass(frozen=True)
class PiToMeConfig:
    """Merge ``r`` tokens per block, choosing them among the tokens most similar to all others
    (PiToMe's energy score) and protecting the isolated, informative ones.

    Args:
        r: tokens removed per block, as for :class:`~tokenprune.ToMeConfig` (an int, ``(r, inflection)``
            or a per-block list; each block removes at most half of its mergeable tokens).
        margin: the similarity m above which a pair counts towards a token's energy: one
            number for every block, a list with one per block, or ``None`` for PiToMe's
            schedule 0.9 − 0.8·l/L over the L blocks.
        alpha: the ELU's α, the most a dissimilar pair can subtract from a token's energy.
        prop_attn, trace_source, backend: as for :class:`~tokenprune.ToMeConfig` (the backend covers the
            merge and the attention; the energy's all-pairs similarity is one matmul).
    """

    r: RSchedule
    margin: float | list[float] | None = None
    alpha: float = 1.0
    prop_attn: bool = True
    trace_source: bool = False
    backend: str = "auto"

    def __post_init__(self) -> None:
        check_common_options(self)
        if self.margin is not None:
            margins = self.margin if isinstance(self.margin, (list, tuple)) else [self.margin]
            for value in margins:
                if not (_is_real(value) and -1.0 <= value <= 1.0):
                    raise ValueError(
                        f"margin must be a cosine similarity in [-1, 1], a list of them (one per block) or None "
                        f"(PiToMe's schedule), got {value!r}"
                    )
        if not (_is_real(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a positive number (PiToMe uses 1.0), got {self.alpha!r}")

    track_positions = False  # energy and matching use features alone
    supports_video = True  # no 2-D grid assumed: merges space-time tokens jointly, as ToMe

    def margins(self, depth: int) -> tuple[float, ...]:
        """One margin per block."""
        if self.margin is None:
            return default_margins(depth)
        if isinstance(self.margin, (list, tuple)):
            if len(self.margin) != depth:
                raise ValueError(f"margin has {len(self.margin)} entries but the model has {depth} blocks; give one per block")
            return tuple(float(m) for m in self.margin)
        return (float(self.margin),) * depth

    def reducers(self, model: nn.Module) -> list[EnergyMerge | None]:
        depth = len(model.blocks)
        counts = resolve_r(self.r, depth)
        protected = block_prefix_tokens(model)
        return [
            EnergyMerge(n, protected, m, float(self.alpha), self.backend) if n > 0 else None
            for n, m in zip(counts, self.margins(depth))
        ]


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
