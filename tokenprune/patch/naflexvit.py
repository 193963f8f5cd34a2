"""Patch for timm's ``NaFlexVit`` (SigLIP 2 NaFlex, RADIO, the ``naflexvit_*`` models) on image
batches [B, C, H, W] of any size: its blocks are timm's ``Block`` (or ``EvaBlock`` with RoPE),
already patched, and its embedding resizes the position embedding to the image's patch grid.
What this module adds: the model forward around the blocks, the family's hooks (any image
size; the embedding module for FLOPs), and timm's NaFlexVit signatures over ReducingViT's.

NaFlex's packed inputs (a dict, or ``patch_coord``/``patch_valid``: sequences of patches from
images of different sizes, padded to one length) are refused while the model is patched.

Importing this module registers the class in :mod:`tokenprune.patch.vit`'s registries.
"""

from __future__ import annotations

from typing import Any

from timm.models.naflexvit import NaFlexVit
from torch import Tensor, nn

from . import vit
from .vit import _NOT_GIVEN, ReducingViT

_PACKED = (
    "NaFlex's packed patch sequences (patch_coord/patch_valid) are not supported by a NaFlexVit patched "
    "by tokenprune: pass image batches [B, C, H, W], or call tokenprune.unpatch(model) for them"
)


def _refuse_packed(patch_coord: Tensor | None, patch_valid: Tensor | None) -> None:
    if patch_coord is not None or patch_valid is not None:
        raise ValueError(_PACKED)


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
            raise ValueError(f"expected an image batch [B, C, H, W] (any size), got {got}. {_PACKED}")
        if self.training and self.patch_drop is not None:
            # Patch dropout removes tokens at random under the patch grid that plans and keep
            # counts use (and, unreduced, would need the RoPE to follow it): refused, not skipped.
            raise ValueError(
                "patch dropout (patch_drop_rate > 0) is not supported while training a patched NaFlexVit; "
                "create the model with patch_drop_rate=0"
            )

    @staticmethod
    def image_grid(model: nn.Module, height: int, width: int) -> tuple[int, int]:
        # any size: the position embedding is resized to the grid
        grid = model.embeds.dynamic_feat_size((height, width))
        return (int(grid[0]), int(grid[1]))

    @staticmethod
    def patch_embedding(model: nn.Module) -> nn.Module:
        return model.embeds

    def _token_grid(self, x: Tensor) -> tuple[int, ...]:
        return self.image_grid(self, *x.shape[-2:])

    def _embed(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        x, grid = self.embeds(x)
        rope = self.rope.get_embed(shape=grid) if self.rope is not None else None
        return self.norm_pre(x), rope

    # timm's NaFlexVit signatures, so that calls written for it keep working; packed inputs refused.

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        patch_coord: Tensor | None = None,
        patch_valid: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """NaFlexVit's forward on an image batch; like timm's, it ignores ``attn_mask`` there."""
        _refuse_packed(patch_coord, patch_valid)
        return super().forward(x)

    def forward_features(  # type: ignore[override]
        self,
        patches: Tensor,
        patch_coord: Tensor | None = None,
        patch_valid: Tensor | None = None,
        attn_mask: Tensor | None = None,
        unmerge: bool = False,
    ) -> Tensor:
        """The reduced tokens of an image batch (``patches``: [B, C, H, W], timm's name), or
        with ``unmerge=True`` the full token grid (see :meth:`ReducingViT.forward_features`)."""
        _refuse_packed(patch_coord, patch_valid)
        return super().forward_features(patches, attn_mask, unmerge=unmerge)

    def forward_head(  # type: ignore[override]
        self, patches: Tensor, pre_logits: bool = False, patch_valid: Tensor | None = None, size: Tensor | None = _NOT_GIVEN
    ) -> Tensor:
        """timm's head on the tokens ``patches``, weighted by ``size`` (see :meth:`ReducingViT.forward_head`)."""
        _refuse_packed(None, patch_valid)
        return super().forward_head(patches, pre_logits=pre_logits, size=size)

    def forward_intermediates(  # type: ignore[override]
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        patch_coord: Tensor | None = None,
        patch_valid: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Any:
        """timm's intermediates on the full token grid. With mixed RoPE, ``stop_early`` stops
        early here (timm's NaFlexVit runs every block there, so its final features differ)."""
        _refuse_packed(patch_coord, patch_valid)
        return super().forward_intermediates(
            x, indices, return_prefix_tokens, norm, stop_early, output_fmt, intermediates_only, output_dict,
            attn_mask=attn_mask,
        )  # fmt: skip


vit.PATCHED_CLASSES[NaFlexVit] = ReducingNaFlexVit
vit._ORIGINAL_CLASSES[ReducingNaFlexVit] = NaFlexVit
