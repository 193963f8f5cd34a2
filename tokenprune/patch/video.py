"""Patch for tokenprune's video ViT (:class:`tokenprune.models.VideoVisionTransformer`, VideoMAE's
joint space-time model): the same reducing blocks and token state as the image ViT, with a 3-D
token grid (frames, rows, cols) so that positions, plans and FLOPs follow the tubelets.

Importing this module registers the class (:func:`tokenprune.patch.vit.register_model_class`)
(``tokenprune.api`` imports it, so ``tokenprune.patch(video_model, ...)`` just works).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..models.video_vit import VideoVisionTransformer
from . import vit
from .vit import ReducingViT


class ReducingVideoVisionTransformer(ReducingViT, VideoVisionTransformer):
    """:class:`VideoVisionTransformer` with token reduction. ``TokenState.grid`` is
    (T', H', W') and token positions are (frame, row, col) centroids in token-grid units."""

    def _check_input(self, x: Tensor) -> None:
        # (the clip's frames and size are checked by the video patch embedding)
        if x.ndim != 5:
            raise ValueError(f"expected a clip [B, C, T, H, W], got shape {tuple(x.shape)}")

    def _token_grid(self, x: Tensor) -> tuple[int, ...]:
        return tuple(int(n) for n in self.patch_embed.dynamic_feat_size(tuple(x.shape[-3:])))

    @staticmethod
    def check_method(model: nn.Module, config: Any) -> None:
        if not getattr(config, "supports_video", False):
            from ..methods import METHODS  # (the methods import the patch modules)

            video_methods = [name for name, cls in METHODS.items() if getattr(cls, "supports_video", False)]
            raise TypeError(
                f"{type(config).__name__} does not support the video ViT (it assumes a 2-D patch grid or a class "
                f"token); video methods: {video_methods}"
            )
        if model.global_pool == "token" and model.num_prefix_tokens == 0:
            raise TypeError(
                "this video ViT classifies its first token (global_pool='token') but has no class token to "
                "protect: merging would move that token. Use global_pool='avg' (VideoMAE's mean pooling)"
            )

    # forward_intermediates' maps: [B, C, T', H', W'], as the unpatched video ViT gives them.
    map_format = "NCTHW"


def is_video_model(model: object) -> bool:
    """Whether ``model`` is (or was, before patching) a video ViT with a 3-D token grid."""
    return isinstance(model, VideoVisionTransformer)


vit.register_model_class(VideoVisionTransformer, ReducingVideoVisionTransformer)
