"""Triton kernels for tokenprune's two hot spots, each next to its pure-PyTorch reference.

* :mod:`kernels.match` — ``best_match(a, b)``: ToMe's "most similar B token for every A token"
  (``(a @ b.T).max(-1)``) fused into one kernel that never writes the [Na, Nb] score matrix.
* :mod:`kernels.attention` — ``attention(q, k, v, key_bias, scale)``: flash attention with
  ToMe's proportional-attention bias (log of the token sizes) built in, tiled to the (short)
  length of merged sequences; the reference is PyTorch SDPA with the bias as a mask.
  ``attention_folded`` is the same through SDPA with the bias folded into q and k, so flash
  attention runs it where the kernel cannot (gradients, ``torch.compile``).
* :mod:`kernels.bipartite` — ``bipartite_dest(best_score, best_b, r, ...)``: ToMe's merge
  assignment (the r best-scoring A tokens go to their partners, the rest keep their order) in
  one launch, where PyTorch needs a stable argsort and about fifteen small kernels;
  ``bipartite_members`` also lays out the merge kernel's member lists (dest's stable sort).
* :mod:`kernels.merge` — ``merge_wavg(x, size, dest, num_out)``: ToMe's size-weighted merge
  (x ← Σ s·x / Σ s), deterministic (no atomics), with a gather backward.
* :mod:`kernels.temporal_match` — ``temporal_best_match(metric, pos, window)``: video temporal
  merging's match (even-frame tokens to odd-frame tokens within a frame gap and a spatial
  window), the rule evaluated from the centroids inside a ``best_match``-style kernel instead of
  on an [N, N] score matrix.

``attention``, ``best_match``, ``bipartite_dest``, ``merge_wavg`` and ``temporal_best_match`` take ``backend="auto" | "triton" | "torch"``: "auto" runs
Triton on CUDA tensors when triton imports and the reference otherwise; "triton" forces the
kernel (on CPU only under ``TRITON_INTERPRET=1``, which is how the tests run it).

Why there is no unmerge kernel: unmerging (restoring one token per input token for dense
outputs) is ``x.gather(1, source_index)`` in torch (:func:`tokenprune.merge.unmerge`). That is
already a single memory-bound kernel: it reads one C-wide row of x per input token and writes
the [B, T_in, C] output once, with no reduction and no arithmetic. A Triton version would do
exactly the same memory traffic, so it could not be faster; it would only add code to keep
correct.
"""

from __future__ import annotations

from kernels.attention import attention, attention_folded, attention_reference, attention_triton
from kernels._triton import BACKENDS, HAS_TRITON, INTERPRET, triton_usable, use_triton
from kernels.bipartite import bipartite_dest, bipartite_dest_reference, bipartite_dest_triton, bipartite_members
from kernels.match import best_match, best_match_reference, best_match_triton
from kernels.merge import MemberLists, merge_wavg, merge_wavg_reference, merge_wavg_triton
from kernels.temporal_match import temporal_best_match, temporal_best_match_reference, temporal_best_match_triton

__all__ = [
    "BACKENDS",
    "attention",
    "attention_folded",
    "attention_reference",
    "attention_triton",
    "HAS_TRITON",
    "INTERPRET",
    "best_match",
    "best_match_reference",
    "best_match_triton",
    "bipartite_dest",
    "bipartite_dest_reference",
    "bipartite_dest_triton",
    "bipartite_members",
    "MemberLists",
    "merge_wavg",
    "merge_wavg_reference",
    "merge_wavg_triton",
    "temporal_best_match",
    "temporal_best_match_reference",
    "temporal_best_match_triton",
    "triton_usable",
    "use_triton",
]
