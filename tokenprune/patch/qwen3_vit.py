"""Patch for timm's Qwen3 ViT: the vision encoder of Qwen3-VL, Qwen3.5, Qwen3.8 and Qwen-Drive
(``timm.list_models("qwen3_vit*")``), bare (``Qwen3VitEncoder``, the ``_enc`` models) or inside
its classifier (``Qwen3VitClassifier``, which ``tokenprune.patch`` reaches through ``encoder``).

The encoder is a plain pre-norm ViT of timm ``EvaBlock``s (patched as in :mod:`.eva`) with no
prefix tokens, a learned position embedding resampled to each input grid, and 2-D RoPE, which
follows merged tokens as in Eva. What differs is what leaves it: timm's encoder returns the
patch grid [B, H, W, C], and reads every position of it: its VLM projector concatenates each
2×2 block of patches into one LLM token, its average pooling takes the mean over the grid. So
the patched encoder unmerges at the end (each patch carries the feature of the token that
absorbed it): the projector gets the grid it was trained on, with the LLM's token count
unchanged, and the mean over the grid is the size-weighted mean of the merged tokens, exactly.
The speed-up is the blocks'; ``forward_tokens`` returns the merged tokens themselves.

Methods that drop tokens (DynamicViT, EViT with ``fuse=False``) are refused: a dropped patch
would reach the grid as zeros.

Importing this module registers the classes in :mod:`tokenprune.patch.vit`'s registries.
"""

from __future__ import annotations

import math
from typing import Any

from timm.models.qwen3_vit import Qwen3VitClassifier, Qwen3VitEncoder
from torch import Tensor, nn

from ..merge import TokenState
from ..merge import unmerge as unmerge_tokens
from . import vit
from .vit import ReducingViT, SettingsThroughPatch, Wrapper, linear_flops, refuse_dropping


class ReducingQwen3VitEncoder(ReducingViT, Qwen3VitEncoder):
    """timm ``Qwen3VitEncoder`` with token reduction; its outputs are timm's, on the unmerged
    patch grid."""

    _positions_follow_sources = True  # 2-D RoPE, always

    # timm's, or ReducingViT's sized head would shadow it: the encoder has no classifier head,
    # and its forward_head raises.
    forward_head = Qwen3VitEncoder.forward_head

    def forward(self, x: Tensor) -> Tensor:
        """timm's outputs: the projector's LLM tokens, the mean over the grid, or the grid."""
        if self.merger is not None:
            _check_projector_grid(self, self._token_grid(x))
        return Qwen3VitEncoder.forward(self, x)

    @staticmethod
    def image_grid(model: nn.Module, height: int, width: int) -> tuple[int, int]:
        # Any size of whole patches, as timm's patch embedding asserts (the position embedding is
        # resampled to the grid); the projector's blocks are checked where it runs.
        patch_h, patch_w = model.patch_embed.patch_size
        if height % patch_h or width % patch_w:
            raise ValueError(
                f"this Qwen3 ViT takes images whose sides are multiples of its {patch_h}x{patch_w} patches, "
                f"got {height}x{width}"
            )
        return (height // patch_h, width // patch_w)

    @staticmethod
    def after_blocks_flops(model: nn.Module, tokens: int, grid: tuple[int, ...]) -> int:
        if model.merger is None:
            return 0
        _check_projector_grid(model, grid)
        llm_tokens = math.prod(grid) // model.merge_size**2  # the projector runs on the unmerged grid
        return linear_flops(llm_tokens, model.merger.fc1) + linear_flops(llm_tokens, model.merger.fc2)

    @staticmethod
    def check_method(model: nn.Module, config: Any) -> None:
        refuse_dropping(config, "the Qwen3 ViT's outputs (the patch grid, the VLM projector's 2x2 blocks, the mean)")

    def _embed(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        return self._pos_embed(self.patch_embed(x))  # tokens [B, H·W, C] and the grid's RoPE

    def _after_blocks(self, state: TokenState) -> TokenState:
        return state  # no final norm

    def forward_features(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """timm's features: the patch grid [B, H, W, C], each patch carrying the feature of the
        token that absorbed it (``forward_tokens`` gives the merged tokens)."""
        state = self.forward_tokens(x, trace_source=True)
        height, width = self._token_grid(x)
        # Nothing merged: timm's own tensor (its memory layout too, which a mean's bits depend on).
        tokens = state.x if state.num_tokens == height * width else unmerge_tokens(state.x, state.source_index)
        return tokens.reshape(x.shape[0], height, width, -1)

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
    ) -> Any:
        """timm's intermediates on the full grid, and its final features as the [B, H, W, C]
        grid (``return_prefix_tokens`` and ``norm`` are unused, as in timm: no prefix, no norm)."""
        out = super().forward_intermediates(
            x, indices, return_prefix_tokens=False, norm=False, stop_early=stop_early, output_fmt=output_fmt,
            intermediates_only=intermediates_only, output_dict=output_dict,
        )  # fmt: skip
        if intermediates_only:
            return out
        height, width = self._token_grid(x)

        def grid(tokens: Tensor) -> Tensor:
            return tokens.reshape(x.shape[0], height, width, -1)

        if output_dict:
            return {**out, "image_features": grid(out["image_features"])}
        final, intermediates = out
        return grid(final), intermediates


def _check_projector_grid(encoder: nn.Module, grid: tuple[int, ...]) -> None:
    """timm's projector concatenates k×k blocks of patches: the grid must tile into them."""
    k = encoder.merge_size
    if grid[0] % k or grid[1] % k:
        patch_h, patch_w = encoder.patch_embed.patch_size
        raise ValueError(
            f"the Qwen3 ViT's VLM projector joins {k}x{k} blocks of patches, so its images' sides must be "
            f"multiples of {k * patch_h}x{k * patch_w}; got a {grid[0]}x{grid[1]} patch grid "
            "(the encoder's forward_features and forward_tokens take it)"
        )


def _classifier_head_flops(model: nn.Module, patches: int) -> int:
    """The classifier's linear head, on the pooled token or (``global_pool=""``) on every output
    token of the encoder: the patches, or the projector's LLM tokens."""
    encoder = model.encoder
    outputs = patches // encoder.merge_size**2 if encoder.merger is not None else patches
    return linear_flops(1 if model.global_pool else outputs, model.head)


class GuardedQwen3VitClassifier(SettingsThroughPatch, Qwen3VitClassifier):
    """timm's Qwen3 ViT classifier while tokenprune has patched its encoder."""


vit.register_model_class(Qwen3VitEncoder, ReducingQwen3VitEncoder)
vit.register_wrapper(Qwen3VitClassifier, Wrapper("encoder", _classifier_head_flops, GuardedQwen3VitClassifier))
