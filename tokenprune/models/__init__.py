"""Model definitions that tokenprune adds to timm's: a video ViT (VideoMAE / ViViT joint
space-time attention) and a VideoMAE checkpoint loader."""

from .video_vit import (
    VideoPatchEmbed,
    VideoVisionTransformer,
    resize_pos_embed,
    sincos_pos_embed,
    video_vit_base_patch16_224,
    video_vit_large_patch16_224,
    video_vit_small_patch16_224,
)
from .videomae import LoadResult, load_videomae, use_transformers_norm_eps, videomae_config_from_transformers

__all__ = [
    "LoadResult",
    "VideoPatchEmbed",
    "VideoVisionTransformer",
    "load_videomae",
    "resize_pos_embed",
    "sincos_pos_embed",
    "use_transformers_norm_eps",
    "video_vit_base_patch16_224",
    "video_vit_large_patch16_224",
    "video_vit_small_patch16_224",
    "videomae_config_from_transformers",
]
