"""Patch for timm's ``NaFlexVit`` (SigLIP 2 NaFlex, RADIO, the ``naflexvit_*`` models) on image
batches [B, C, H, W] of any size: its blocks are timm's ``Block`` (or ``EvaBlock`` with RoPE),
already patched, and its embedding resizes the position embedding to the image's patch grid,
so what this module adds is the model forward around them.

NaFlex's packed inputs (a dict, or ``patch_coord``/``patch_valid``: sequences of patches from
images of different sizes, padded to one length) are refused while the model is patched.

Importing this module registers the class in :mod:`tokenprune.patch.vit`'s registries.
"""

from __future__ import annotations

from typing import Any

from timm.models.naflexvit import NaFlexVit
from torch import Tensor

from . import vit
from .vit import ReducingViT


class ReducingNaFlexVit(ReducingViT, NaFlexVit):
    """timm ``NaFlexVit`` with token reduction, on image batches; RoPE (when configured) follows
    the merged tokens as in Eva."""

    @property
    def _position_per_block(self) -> bool:  # type: ignore[override]
        return bool(self.rope_is_mixed)

    @property
    def _positions_follow_sources(self) -> bool:  # type: ignore[override]
        return self.rope is not None

    def _check_input(self, x: Any) -> None:
        if not isinstance(x, Tensor) or x.ndim != 4:
            got = "a dict" if isinstance(x, dict) else f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"a NaFlexVit patched by tokenprune takes image batches [B, C, H, W] (any size), got {got}; "
                "NaFlex's packed patch sequences are not supported: call tokenprune.unpatch(model) for them"
            )
        if self.training and self.patch_drop is not None:
            # Patch dropout removes tokens at random under the patch grid that plans and keep counts use.
            raise ValueError(
                "patch dropout (patch_drop_rate > 0) is not supported while training a patched NaFlexVit; "
                "create the model with patch_drop_rate=0"
            )

    def _token_grid(self, x: Tensor) -> tuple[int, ...]:
        return tuple(int(n) for n in self.embeds.dynamic_feat_size(tuple(x.shape[-2:])))

    def _embed(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        x, grid = self.embeds(x)
        rope = self.rope.get_embed(shape=grid) if self.rope is not None else None
        return self.norm_pre(x), rope

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        patch_coord: Tensor | None = None,
        patch_valid: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """NaFlexVit's forward on an image batch (``patch_coord``/``patch_valid`` refused)."""
        if patch_coord is not None or patch_valid is not None:
            raise ValueError(
                "a NaFlexVit patched by tokenprune takes image batches [B, C, H, W]; patch_coord/patch_valid "
                "(NaFlex's packed patch sequences) are not supported: call tokenprune.unpatch(model) for them"
            )
        return super().forward(x, attn_mask)


vit.PATCHED_CLASSES[NaFlexVit] = ReducingNaFlexVit
vit._ORIGINAL_CLASSES[ReducingNaFlexVit] = NaFlexVit
