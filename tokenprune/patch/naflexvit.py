"""Patch for timm's ``NaFlexVit`` (SigLIP 2 NaFlex, RADIO, the ``naflexvit_*`` models): its
blocks are timm's ``Block`` (or ``EvaBlock`` with RoPE), already patched. What this module adds:
the model forward around the blocks, the family's hooks (any image size; packed sequences of N
positions; the embedding module for FLOPs), and timm's NaFlexVit signatures over ReducingViT's,
on both kinds of input:

- image batches [B, C, H, W] of any size (the embedding resizes the position embedding);
- packed sequences, NaFlex's own input (timm's NaFlex collator: a dict of ``patches``
  [B, N, P·P·C], ``patch_coord`` [B, N, 2] and ``patch_valid`` [B, N], the patches of images of
  different sizes padded to one length N). The padding enters the blocks as tokens of size 0
  (:attr:`tokenprune.merge.TokenState.padded`): attention masks it out, with or without
  proportional attention, as timm's mask from ``patch_valid`` does; ToMe's matching spends
  each sequence's r merges on its padding first (:func:`tokenprune.merge.padding_first_matching`),
  and merging a size-0 token changes no real one; pooling weighs it 0. So every sequence of the
  pack loses r tokens per block, padding before patches, and keeps more of its patches the
  more padding it has. RoPE (Eva weights loaded with timm's ``use_naflex=True``) follows merged
  tokens over their patches, padding left out. Methods whose config has ``supports_padding``
  (ToMe); not with timm's convolutional patch embedding (image batches only, patched or not).

Importing this module registers the class in :mod:`tokenprune.patch.vit`'s registries.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models.naflexvit import NaFlexVit
from torch import Tensor, nn

from ..merge import unmerge as unmerge_tokens
from ..methods import METHODS
from . import vit
from .vit import _NOT_GIVEN, ReducingViT

_INPUTS = "an image batch [B, C, H, W] (any size) or packed patches (timm's NaFlex dict, or patches with patch_coord)"


def packed_input(
    x: Tensor | dict[str, Tensor], patch_coord: Tensor | None, patch_valid: Tensor | None, attn_mask: Tensor | None
) -> dict[str, Tensor | None] | None:
    """timm's NaFlex mode as one dict (``patches``, ``patch_coord``, ``patch_valid``; entries of a
    dict input take priority, as in timm), or None for an image batch."""
    if isinstance(x, dict):
        if "patches" not in x:
            raise ValueError(
                f"a packed input is timm's NaFlex dict with 'patches', 'patch_coord' and 'patch_valid'; got keys {sorted(x)}"
            )
        patch_coord, patch_valid = x.get("patch_coord", patch_coord), x.get("patch_valid", patch_valid)
        attn_mask, x = x.get("attn_mask", attn_mask), x["patches"]
    elif patch_coord is None:
        if patch_valid is not None:
            raise ValueError("patch_valid marks the padding of packed patches: pass patch_coord with them too")
        return None
    if patch_coord is None:
        raise ValueError("packed patches need their patch_coord [B, N, 2] (timm's NaFlex collator makes them)")
    if attn_mask is not None:
        raise ValueError(
            "attn_mask replaces the padding mask timm builds from patch_valid, and cannot follow merged tokens: "
            "leave it None (a patched NaFlexVit masks the padding itself), or call tokenprune.unpatch(model)"
        )
    return {"patches": x, "patch_coord": patch_coord, "patch_valid": patch_valid}


class ReducingNaFlexVit(ReducingViT, NaFlexVit):
    """timm ``NaFlexVit`` with token reduction, on image batches and packed sequences; RoPE
    (when configured) follows the merged tokens as in Eva."""

    @property
    def _position_per_block(self) -> bool:  # type: ignore[override]
        return bool(self.rope_is_mixed)

    @property
    def _positions_follow_sources(self) -> bool:  # type: ignore[override]
        return self.rope is not None

    def _check_input(self, x: Any) -> None:
        if isinstance(x, dict):
            self._check_packed(x)
        elif not isinstance(x, Tensor) or x.ndim != 4:
            got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected {_INPUTS}, got {got}")
        if self.training and self.patch_drop is not None:
            # Patch dropout removes tokens at random under the patch grid that plans and keep
            # counts use (and, unreduced, would need the RoPE to follow it): refused, not skipped.
            raise ValueError(
                "patch dropout (patch_drop_rate > 0) is not supported while training a patched NaFlexVit; "
                "create the model with patch_drop_rate=0"
            )

    def _check_packed(self, packed: dict[str, Tensor | None]) -> None:
        # (the method and the embedding are refused by packed_grid, which every packed forward asks)
        patches, coord, valid = packed["patches"], packed["patch_coord"], packed["patch_valid"]
        if patches.ndim < 3 or coord.shape != (*patches.shape[:2], 2):
            raise ValueError(
                f"packed patches [B, N, ...] need patch_coord [B, N, 2], got {tuple(patches.shape)} and {tuple(coord.shape)}"
            )
        if valid is not None and valid.shape != patches.shape[:2]:
            raise ValueError(f"patch_valid must be [B, N] = {tuple(patches.shape[:2])}, got {tuple(valid.shape)}")

    def _valid_tokens(self, x: Any) -> Tensor | None:
        if not isinstance(x, dict) or x["patch_valid"] is None:
            return None
        return self._with_prefix(x["patch_valid"])

    def _with_prefix(self, patch_valid: Tensor) -> Tensor:
        """[B, prefix + N] bool: ``patch_valid`` behind the prefix tokens, which are always valid."""
        valid = patch_valid.bool()
        return torch.cat([valid.new_ones(valid.shape[0], self.num_prefix_tokens), valid], dim=1)

    @staticmethod
    def image_grid(model: nn.Module, height: int, width: int) -> tuple[int, int]:
        # any size: the position embedding is resized to the grid. timm's linear embedding
        # patchifies whole patches only (a reshape that fails otherwise) unless it pads; the
        # convolutional one drops a partial patch, as dynamic_feat_size counts.
        embeds = model.embeds
        patch_h, patch_w = embeds.patch_size
        if embeds.is_linear and not embeds.dynamic_img_pad and (height % patch_h or width % patch_w):
            raise ValueError(
                f"this NaFlexVit takes images whose sides are multiples of its {patch_h}x{patch_w} patches, got "
                f"{height}x{width}; create it with dynamic_img_pad=True for any size"
            )
        grid = embeds.dynamic_feat_size((height, width))
        return (int(grid[0]), int(grid[1]))

    @staticmethod
    def patch_embedding(model: nn.Module) -> nn.Module:
        return model.embeds

    @staticmethod
    def packed_grid(model: nn.Module, packed: dict[str, Tensor]) -> tuple[int]:
        """(N,): packed patches are sequences of N positions (a family hook; only NaFlexVit's)."""
        ReducingNaFlexVit._refuse_convolutional_embedding(model)
        ReducingNaFlexVit._refuse_method_without_padding(model)
        return (int(packed["patches"].shape[1]),)

    @staticmethod
    def _refuse_method_without_padding(model: nn.Module) -> None:
        config = getattr(model, "tokenprune_config", None)
        if config is not None and not getattr(config, "supports_padding", False):
            methods = [name for name, cls in METHODS.items() if getattr(cls, "supports_padding", False)]
            raise ValueError(
                f"{type(config).__name__} cannot tell NaFlex's padding from patches: packed inputs run with "
                f"method {' or '.join(map(repr, methods))}; pass image batches [B, C, H, W] for this method"
            )

    @staticmethod
    def _refuse_convolutional_embedding(model: nn.Module) -> None:
        if not model.embeds.is_linear:
            raise ValueError(
                "timm's convolutional patch embedding takes image batches only (unpatched too): pass [B, C, H, W], "
                "or create the model with embed_proj_type='linear' for packed patches"
            )

    def _token_grid(self, x: Any) -> tuple[int, ...]:
        if isinstance(x, dict):
            return self.packed_grid(self, x)
        return self.image_grid(self, *x.shape[-2:])

    def _embed(self, x: Any) -> tuple[Tensor, Tensor | None]:
        if isinstance(x, dict):
            tokens, _ = self.embeds(x["patches"], patch_coord=x["patch_coord"], patch_valid=x["patch_valid"])
            rope = None
            if self.rope is not None:  # each sequence's own grid; mixed RoPE: one per block
                rope = self._generate_rope_naflex(tokens, x["patch_coord"])
                rope = list(rope) if self.rope_is_mixed else rope
            return self.norm_pre(tokens), rope
        tokens, grid = self.embeds(x)
        rope = self.rope.get_embed(shape=grid) if self.rope is not None else None
        return self.norm_pre(tokens), rope

    def forward_tokens(  # type: ignore[override]
        self,
        x: Tensor | dict[str, Tensor],
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        trace_source: bool | None = None,
    ) -> Any:
        """:meth:`ReducingViT.forward_tokens` on an image batch or on packed patches (timm's
        NaFlex dict)."""
        if isinstance(x, dict):
            x, attn_mask = packed_input(x, None, None, attn_mask), None
        return super().forward_tokens(x, attn_mask, is_causal, trace_source)

    # timm's NaFlexVit signatures, so that calls written for it keep working.

    def forward(  # type: ignore[override]
        self,
        x: Tensor | dict[str, Tensor],
        patch_coord: Tensor | None = None,
        patch_valid: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """NaFlexVit's forward on an image batch (where, like timm's, it ignores ``attn_mask``) or
        on packed patches (see the module docstring)."""
        packed = packed_input(x, patch_coord, patch_valid, attn_mask)
        return super().forward(x if packed is None else packed)

    def forward_features(  # type: ignore[override]
        self,
        patches: Tensor | dict[str, Tensor],
        patch_coord: Tensor | None = None,
        patch_valid: Tensor | None = None,
        attn_mask: Tensor | None = None,
        unmerge: bool = False,
    ) -> Tensor | dict[str, Tensor | None]:
        """The reduced tokens of an image batch (``patches``: [B, C, H, W], timm's name), or with
        ``unmerge=True`` the full token grid (see :meth:`ReducingViT.forward_features`).

        Packed patches give timm's dict: ``patches``, the reduced tokens, ``patch_valid``, which of
        them are patches rather than padding (prefix tokens left out, as in timm), and ``size``,
        the patches each stands for, which :meth:`forward_head` needs; ``forward_head(**features)``
        works as in timm. With ``unmerge=True``: one token per input position and timm's
        ``patch_valid``."""
        packed = packed_input(patches, patch_coord, patch_valid, attn_mask)
        if packed is None:
            return super().forward_features(patches, attn_mask, unmerge=unmerge)
        state = self.forward_tokens(packed, trace_source=True if unmerge else None)
        if unmerge:
            full, valid = unmerge_tokens(state.x, state.source_index), packed["patch_valid"]
            size = None if valid is None else self._position_weights(valid, full)
            return {"patches": full, "patch_valid": valid, "size": size}
        real = None if state.size is None else state.size[:, self.num_prefix_tokens :, 0] > 0
        return {"patches": state.x, "patch_valid": real, "size": state.size}

    def forward_head(  # type: ignore[override]
        self,
        patches: Tensor,
        pre_logits: bool = False,
        patch_valid: Tensor | None = None,
        size: Tensor | None = _NOT_GIVEN,
    ) -> Tensor:
        """timm's head on the tokens ``patches``, weighted by ``size`` (see
        :meth:`ReducingViT.forward_head`). With ``patch_valid`` (packed inputs) padding counts 0;
        ``forward_head(**model.forward_features(packed))`` passes both. ``size=None``: the tokens
        are one per input position."""
        if patch_valid is None:
            return super().forward_head(patches, pre_logits=pre_logits, size=size)
        if size is _NOT_GIVEN:  # tokens that may be merged need their sizes, as on image batches
            self._refuse_unsized_pooling()
            size = None
        if size is None:  # one token per position (an unreduced model's): padding counts 0
            size = self._position_weights(patch_valid, patches)
        return self._forward_head_sized(patches, size, pre_logits, padded=True)

    def _position_weights(self, patch_valid: Tensor, tokens: Tensor) -> Tensor:
        """[B, T, 1] pooling weights of tokens at their input positions: 1, and 0 for padding."""
        if tokens.shape[1] != self.num_prefix_tokens + patch_valid.shape[1]:
            raise ValueError(
                f"{tokens.shape[1]} tokens for {patch_valid.shape[1]} positions (+ {self.num_prefix_tokens} prefix): "
                "merged tokens pool by their sizes; use forward_head(**model.forward_features(packed))"
            )
        return self._with_prefix(patch_valid).unsqueeze(-1).float()

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
        """timm's intermediates of an image batch on the full token grid. With mixed RoPE,
        ``stop_early`` stops early here (timm's NaFlexVit runs every block there, so its final
        features differ). Packed inputs are refused: ``forward_features(packed, unmerge=True)``
        gives their last tokens one per position."""
        if packed_input(x, patch_coord, patch_valid, None) is not None:
            raise ValueError(
                "forward_intermediates of packed patches is not supported by a patched NaFlexVit: pass image "
                "batches, use forward_features(packed, unmerge=True) for per-position features, or call "
                "tokenprune.unpatch(model)"
            )
        return super().forward_intermediates(
            x, indices, return_prefix_tokens, norm, stop_early, output_fmt, intermediates_only, output_dict,
            attn_mask=attn_mask,
        )  # fmt: skip


vit.register_model_class(NaFlexVit, ReducingNaFlexVit)
