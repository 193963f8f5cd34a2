"""An independent reference of PiToMe's matching (Tran et al., NeurIPS 2024) for timm ViTs.

Written from the paper's description in the released code's formulation, unlike tokenprune's
``dest``: the energy's piecewise form written out, protected tokens gathered in energy order,
the A tokens summed into their B partners with ``scatter_reduce``, output
[prefix, protected, B]. Use it with :func:`tests.tome_reference.tome_reference_forward`
(``match=``), whose block ignores LayerScale as both published codes do.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Below this, float32 rounding (fused vs manual attention, reduction order) can swap two
# values, so the order is not defined; tests use inputs whose decisions are further apart.
NEAR_TIE = 1e-7


class NearTie(AssertionError):
    pass


def pitome_match(metric: Tensor, r: int, num_prefix: int, margin: float, alpha: float = 1.0):
    r = min(r, (metric.shape[1] - num_prefix) // 2)
    body = metric[:, num_prefix:]
    body = body / body.norm(dim=-1, keepdim=True)
    similarity = body @ body.transpose(-1, -2)
    shifted = similarity - margin
    energy = torch.where(shifted >= 0, shifted, alpha * torch.expm1(shifted)).mean(dim=-1)
    order = energy.argsort(dim=-1, descending=True, stable=True)
    ranked = energy.gather(1, order[:, : 2 * r + 1])
    if (ranked[:, :-1] - ranked[:, 1:]).min() < NEAR_TIE:
        raise NearTie("two merge candidates' energies are within float noise: either order is right")
    candidates, protected_idx = order[:, : 2 * r], order[:, 2 * r :]
    a_idx, b_idx = candidates[:, ::2], candidates[:, 1::2]
    batch = metric.shape[0]
    rows = torch.arange(batch)[:, None, None]
    a_to_b = similarity[rows, a_idx[:, :, None], b_idx[:, None, :]]
    top2 = a_to_b.topk(min(2, r), dim=-1).values
    if r > 1 and (top2[..., 0] - top2[..., 1]).min() < NEAR_TIE:
        raise NearTie("an A token's two best partners are within float noise: either choice is right")
    dst_idx = a_to_b.argmax(dim=-1)

    def merge(x: Tensor, mode: str) -> Tensor:
        prefix, rest = x[:, :num_prefix], x[:, num_prefix:]
        channels = x.shape[-1]
        protected = rest.gather(1, protected_idx[..., None].expand(-1, -1, channels))
        src = rest.gather(1, a_idx[..., None].expand(-1, -1, channels))
        dst = rest.gather(1, b_idx[..., None].expand(-1, -1, channels))
        dst = dst.scatter_reduce(1, dst_idx[..., None].expand(-1, -1, channels), src, reduce=mode)
        return torch.cat([prefix, protected, dst], dim=1)

    return merge
