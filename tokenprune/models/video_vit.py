"""A timm-style video Vision Transformer with joint space-time attention (VideoMAE / ViViT
model 1 "spatio-temporal attention").

Layout, the same as VideoMAE (Tong et al. 2022) and its Hugging Face port:

* input clips are ``[B, C, T, H, W]`` (VideoMAE's own layout; Hugging Face's ``pixel_values``
  are ``[B, T, C, H, W]`` and must be permuted);
* a ``Conv3d`` with kernel = stride = (tubelet, patch, patch) embeds every tubelet; the tokens are
  ``[B, N, C]`` with N = T'·H'·W' in (t, h, w) raster order: token ``t·H'·W' + h·W' + w``;
* no class token: position embedding is added to the patch tokens only, fine-tuned models
  pool by the mean over all tokens, then ``fc_norm`` (``norm`` is then an Identity);
* a stack of timm's standard ``Block`` (pre-norm, fused-qkv ``Attention``, GELU MLP).

The attribute names and their meaning follow ``timm.models.vision_transformer.VisionTransformer``
(``patch_embed``, ``_pos_embed``, ``patch_drop``, ``norm_pre``, ``blocks``, ``norm``,
``attn_pool``, ``global_pool``, ``pool_include_prefix``, ``num_prefix_tokens``, ``fc_norm``,
``head_drop``, ``head``, ``grad_checkpointing``, ``dynamic_img_size``), so code written against
timm ViTs can drive this model the same way.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import LayerNorm, resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "VideoPatchEmbed",
    "VideoVisionTransformer",
    "resize_pos_embed",
    "sincos_pos_embed",
    "video_vit_base_patch16_224",
    "video_vit_large_patch16_224",
    "video_vit_small_patch16_224",
]


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


def sincos_pos_embed(num_positions: int, dim: int, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """VideoMAE's fixed sinusoid table, [1, num_positions, dim].

    The 1-D Transformer encoding over the flattened (t, h, w) token index p, with interleaved
    channels (not the 2-D/3-D split of MAE): angle(p, j) = p / 10000^(2·⌊j/2⌋ / dim),
    channel j = sin(angle) for even j, cos(angle) for odd j. Computed in float64 like VideoMAE's
    numpy code, then cast.
    """
    position = torch.arange(num_positions, dtype=torch.float64, device=device)[:, None]
    exponent = (2 * (torch.arange(dim, device=device) // 2)).to(torch.float64) / dim
    angle = position / torch.pow(torch.tensor(10000.0, dtype=torch.float64, device=device), exponent)
    table = torch.where(torch.arange(dim, device=device) % 2 == 0, angle.sin(), angle.cos())
    return table.to(dtype).unsqueeze(0)


def resize_pos_embed(
    pos_embed: Tensor, new_grid: tuple[int, int, int], old_grid: tuple[int, int, int]
) -> Tensor:
    """Resample a learned [1, T·H·W, C] position embedding from ``old_grid`` (T, H, W) to
    ``new_grid``, tokens in (t, h, w) order.

    Time is resampled linearly (``F.interpolate`` mode 'linear', align_corners=False), then every
    frame's spatial map bicubically with antialiasing, exactly as timm's
    ``resample_abs_pos_embed`` does for image ViTs (so a frames-only or a spatial-only change is
    the textbook 1-D / timm 2-D resize). Interpolation runs in float32; the dtype is kept.
    VideoMAE's own scripts resize a learned table with plain bicubic (no antialiasing): the two
    differ, most when shrinking; VideoMAE's released models use the fixed sin-cos table, which
    the loader recomputes for the new grid instead of resizing.
    """
    old_t, old_h, old_w = old_grid
    new_t, new_h, new_w = new_grid
    if pos_embed.shape[1] != old_t * old_h * old_w:
        raise ValueError(
            f"position embedding has {pos_embed.shape[1]} entries, not {old_t}x{old_h}x{old_w}={old_t * old_h * old_w}"
        )
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    dtype, dim = pos_embed.dtype, pos_embed.shape[-1]
    x = pos_embed.float()
    if new_t != old_t:
        x = rearrange(x, "1 (t s) c -> 1 (s c) t", t=old_t)
        x = F.interpolate(x, size=new_t, mode="linear", align_corners=False)
        x = rearrange(x, "1 (s c) t -> 1 (t s) c", c=dim)
    if (new_h, new_w) != (old_h, old_w):
        frames = rearrange(x, "1 (t s) c -> t s c", t=new_t)
        frames = torch.cat(
            [
                resample_abs_pos_embed(f[None], new_size=[new_h, new_w], old_size=[old_h, old_w], num_prefix_tokens=0)
                for f in frames
            ]
        )
        x = rearrange(frames, "t s c -> 1 (t s) c")
    return x.to(dtype)


class VideoPatchEmbed(nn.Module):
    """Tubelet embedding: [B, C, T, H, W] → [B, T'·H'·W', D] tokens in (t, h, w) order
    (or [B, T', H', W', D] when ``flatten`` is False, for ``dynamic_img_size``).

    Mirrors timm's ``PatchEmbed`` attributes: ``img_size`` (H, W), ``patch_size`` (ph, pw),
    ``grid_size``, ``num_patches``, ``strict_img_size``, ``dynamic_img_pad`` (always False),
    ``flatten``, ``proj`` and ``norm``; adds ``num_frames``, ``tubelet_size``. ``grid_size`` is
    the 3-D token grid (T', H', W'); ``spatial_grid_size`` is (H', W').
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        num_frames: int = 16,
        tubelet_size: int = 2,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
        flatten: bool = True,
        strict_img_size: bool = True,
    ) -> None:
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        self.num_frames = int(num_frames)
        self.tubelet_size = int(tubelet_size)
        sizes = {"num_frames": self.num_frames, "tubelet_size": self.tubelet_size, "img_size": min(self.img_size),
                 "patch_size": min(self.patch_size)}
        for name, size in sizes.items():
            if size < 1:
                raise ValueError(f"{name} must be positive, got {size}")
        self.check_clip_size(self.num_frames, *self.img_size, what="")
        self.grid_size = (
            self.num_frames // self.tubelet_size,
            self.img_size[0] // self.patch_size[0],
            self.img_size[1] // self.patch_size[1],
        )
        self.num_patches = self.grid_size[0] * self.grid_size[1] * self.grid_size[2]
        self.flatten = flatten
        self.strict_img_size = strict_img_size
        self.dynamic_img_pad = False
        self.proj = nn.Conv3d(
            in_chans,
            embed_dim,
            kernel_size=(self.tubelet_size, *self.patch_size),
            stride=(self.tubelet_size, *self.patch_size),
            bias=bias,
        )
        self.norm = nn.Identity()

    @property
    def spatial_grid_size(self) -> tuple[int, int]:
        return self.grid_size[1], self.grid_size[2]

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, int]:
        return max(self.patch_size) if as_scalar else self.patch_size

    def check_clip_size(self, frames: int, height: int, width: int, what: str = "input ") -> None:
        """Raise unless frames, height and width are multiples of the tubelet and patch size."""
        for name, size, step in (("frames", frames, self.tubelet_size), ("height", height, self.patch_size[0]),
                                 ("width", width, self.patch_size[1])):
            if size % step:
                raise ValueError(f"{what}{name} {size} is not a multiple of the tubelet/patch size {step}")

    def dynamic_feat_size(self, size: tuple[int, ...]) -> tuple[int, ...]:
        """Token grid for an input size: (H, W) → (H', W') as in timm; (T, H, W) → (T', H', W')."""
        if len(size) == 2:
            return int(size[0]) // self.patch_size[0], int(size[1]) // self.patch_size[1]
        frames, height, width = size
        return (
            int(frames) // self.tubelet_size,
            int(height) // self.patch_size[0],
            int(width) // self.patch_size[1],
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 5:
            raise ValueError(f"expected a clip [B, C, T, H, W], got shape {tuple(x.shape)}")
        channels = self.proj.in_channels
        if x.shape[1] != channels:
            # Many video loaders give frames first; read as C, the frame count would be misreported.
            frames_first = " (frames first? x.permute(0, 2, 1, 3, 4))" if x.shape[2] == channels else ""
            raise ValueError(f"expected a clip [B, C={channels}, T, H, W], got shape {tuple(x.shape)}{frames_first}")
        _, _, frames, height, width = x.shape
        if self.strict_img_size and (frames, height, width) != (self.num_frames, *self.img_size):
            raise ValueError(
                f"the model takes {self.num_frames} frames of {self.img_size[0]}x{self.img_size[1]}, got "
                f"{frames} frames of {height}x{width}; create it with dynamic_img_size=True to vary the clip size"
            )
        self.check_clip_size(frames, height, width)
        x = self.proj(x)
        pattern = "b c t h w -> b (t h w) c" if self.flatten else "b c t h w -> b t h w c"
        return self.norm(rearrange(x, pattern))


class VideoVisionTransformer(nn.Module):
    """Video ViT with joint space-time attention over tubelet tokens (VideoMAE's fine-tuning
    model), built from timm's ``Block``.

    Args:
        img_size, patch_size: spatial input and patch size (int or (H, W)).
        num_frames, tubelet_size: frames per clip and frames per tubelet (T' = frames / tubelet).
        in_chans, num_classes: input channels, classes (0: no head; default Kinetics-400).
        global_pool: 'avg' (VideoMAE ``use_mean_pooling``: mean of all tokens → ``fc_norm``;
            ``norm`` is an Identity) or 'token' (the first token after ``norm``, as VideoMAE does
            without mean pooling: there is no class token, so this is the first tubelet).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias, qk_norm, init_values: the blocks'
            shape, as in timm (init_values > 0 adds LayerScale: VideoMAE's ``gamma_1/2``).
            ``qkv_bias`` builds timm's fused q/k/v bias; VideoMAE learns only q and v biases,
            :func:`tokenprune.models.load_videomae` loads k's as zeros.
        pos_embed: 'sincos' (VideoMAE's fixed table, a non-persistent buffer) or 'learned'.
        layer_norm_eps: eps of every LayerNorm (VideoMAE 1e-6; the Hugging Face port 1e-12).
        fc_norm_eps: eps of ``fc_norm`` (default: ``layer_norm_eps``; Hugging Face uses 1e-5).
        dynamic_img_size: accept other clip sizes; the sin-cos table is then computed for the
            input's token count (what VideoMAE does when built for that size) and a learned
            embedding is resampled with :func:`resize_pos_embed`.
        drop_rate, pos_drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate: dropouts
            (drop path grows linearly with depth as in timm/VideoMAE).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        num_frames: int = 16,
        tubelet_size: int = 2,
        in_chans: int = 3,
        num_classes: int = 400,
        global_pool: Literal["avg", "token"] = "avg",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        init_values: float | None = None,
        pos_embed: Literal["sincos", "learned"] = "sincos",
        layer_norm_eps: float = 1e-6,
        fc_norm_eps: float | None = None,
        dynamic_img_size: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if global_pool not in ("avg", "token"):
            raise ValueError(f"global_pool must be 'avg' or 'token', got {global_pool!r}")
        if pos_embed not in ("sincos", "learned"):
            raise ValueError(f"pos_embed must be 'sincos' or 'learned', got {pos_embed!r}")
        norm_layer = partial(LayerNorm, eps=layer_norm_eps)
        use_fc_norm = global_pool == "avg"

        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_frames = int(num_frames)
        self.tubelet_size = int(tubelet_size)
        self.num_prefix_tokens = 0
        self.num_reg_tokens = 0
        self.has_class_token = False
        self.no_embed_class = True
        self.cls_token = None
        self.reg_token = None
        self.pool_include_prefix = False
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False
        self.pos_embed_type = pos_embed

        self.patch_embed = VideoPatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            num_frames=num_frames,
            tubelet_size=tubelet_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            flatten=not dynamic_img_size,
            strict_img_size=not dynamic_img_size,
        )
        num_patches = self.patch_embed.num_patches
        if pos_embed == "sincos":
            self.register_buffer("pos_embed", sincos_pos_embed(num_patches, embed_dim), persistent=False)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim))
        self.pos_drop = nn.Dropout(p=pos_drop_rate)
        self.patch_drop = nn.Identity()
        self.norm_pre = nn.Identity()

        dpr = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]  # linspace
        self.blocks = nn.Sequential(
            *[
                Block(
                    dim=embed_dim,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_norm=qk_norm,
                    init_values=init_values,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[i],
                    norm_layer=norm_layer,
                    act_layer=nn.GELU,
                )
                for i in range(depth)
            ]
        )
        self.norm = nn.Identity() if use_fc_norm else norm_layer(embed_dim)
        self.attn_pool = None
        self.fc_norm = LayerNorm(embed_dim, eps=layer_norm_eps if fc_norm_eps is None else fc_norm_eps) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    # ----------------------------------------------------------------- setup

    def init_weights(self) -> None:
        """timm/VideoMAE init: truncated normal (std .02) for linears and a learned position
        embedding, zero biases, unit LayerNorms; the Conv3d keeps PyTorch's default."""
        if isinstance(self.pos_embed, nn.Parameter):
            trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"} if isinstance(self.pos_embed, nn.Parameter) else set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None and global_pool != self.global_pool:
            raise ValueError("changing the pooling would change fc_norm/norm; build a new model instead")
        self.num_classes = num_classes
        # On the model's device and in its dtype, as timm's heads: after model.half() or .cuda() too.
        reference = self.patch_embed.proj.weight
        self.head = (
            nn.Linear(self.embed_dim, num_classes, device=reference.device, dtype=reference.dtype)
            if num_classes > 0
            else nn.Identity()
        )

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """(T', H', W') token grid for the model's clip size."""
        return self.patch_embed.grid_size

    # --------------------------------------------------------------- forward

    def _pos_embed(self, x: Tensor) -> Tensor:
        """Add the position embedding: [B, N, C] → [B, N, C], or with ``dynamic_img_size``
        [B, T', H', W', C] → [B, N, C] with the embedding fitted to that grid."""
        if self.dynamic_img_size:
            batch, frames, height, width, dim = x.shape
            x = x.reshape(batch, -1, dim)
            grid = (frames, height, width)
            if grid == tuple(self.patch_embed.grid_size):
                pos_embed = self.pos_embed
            elif self.pos_embed_type == "sincos":
                pos_embed = sincos_pos_embed(x.shape[1], dim, dtype=self.pos_embed.dtype, device=x.device)
            else:
                pos_embed = resize_pos_embed(self.pos_embed, grid, self.patch_embed.grid_size)
        else:
            pos_embed = self.pos_embed
        x = x + pos_embed.to(x.dtype)
        return self.pos_drop(x)

    def _embed_tokens(self, x: Tensor) -> Tensor:
        """[B, C, T, H, W] clip → [B, N, C] tokens entering the first block."""
        return self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))

    def _block_forward(self, block: nn.Module, x: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(block, x, attn_mask, is_causal, use_reentrant=False)
        return block(x, attn_mask=attn_mask, is_causal=is_causal)

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """[B, C, T, H, W] clip → [B, N, C] tokens (t, h, w order) after the blocks and ``norm``."""
        x = self._embed_tokens(x)
        for block in self.blocks:
            x = self._block_forward(block, x, attn_mask, is_causal)
        return self.norm(x)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCTHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor | tuple[Tensor, list[Tensor]] | list[Tensor] | dict[str, object]:
        """timm's ``forward_intermediates`` for clips: the tokens after the blocks ``indices``
        (an int n: the last n blocks; a list: those blocks, negative from the end), as
        [B, C, T', H', W'] maps (``output_fmt="NCTHW"``) or [B, N, C] tokens (``"NLC"``); with
        ``norm`` through the final norm. Returns (final tokens, intermediates), the intermediates
        alone with ``intermediates_only``, or timm's dict with ``output_dict``. The model has no
        prefix tokens, so ``return_prefix_tokens`` changes nothing."""
        from timm.models._features import feature_take_indices

        if output_fmt not in ("NCTHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCTHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        grid = self.patch_embed.dynamic_feat_size(tuple(x.shape[-3:]))
        x = self._embed_tokens(x)
        intermediates = []
        for i, block in enumerate(self.blocks[: max_index + 1] if stop_early else self.blocks):
            x = self._block_forward(block, x, attn_mask, is_causal)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        if output_fmt == "NCTHW":
            intermediates = [y.reshape(y.shape[0], *grid, y.shape[-1]).movedim(-1, 1).contiguous() for y in intermediates]
        if output_dict:
            result: dict[str, object] = {"image_intermediates": intermediates}
            if not intermediates_only:
                result["image_features"] = self.norm(x)
            return result
        return intermediates if intermediates_only else (self.norm(x), intermediates)

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        if not pool_type:
            return x
        if pool_type == "token":
            return x[:, 0]
        if not self.pool_include_prefix:
            x = x[:, self.num_prefix_tokens :]
        if pool_type == "avg":
            return x.mean(dim=1)
        raise ValueError(f"unknown pool type {pool_type!r}")

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Mean over tokens (or the first token for 'token') → fc_norm → head_drop → head."""
        x = self.pool(x)
        x = self.fc_norm(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        return self.forward_head(self.forward_features(x, attn_mask=attn_mask, is_causal=is_causal))


def _create(num_frames: int, defaults: dict, kwargs: dict) -> VideoVisionTransformer:
    return VideoVisionTransformer(num_frames=num_frames, **{**defaults, **kwargs})


def video_vit_small_patch16_224(num_frames: int = 16, **kwargs) -> VideoVisionTransformer:
    """VideoMAE ViT-S/16 (dim 384, depth 12, 6 heads), tubelet 2×16×16, 224², Kinetics-400 head
    by default: 16 frames give 8×14×14 = 1568 tokens. ``kwargs`` override any
    :class:`VideoVisionTransformer` argument."""
    return _create(num_frames, dict(patch_size=16, img_size=224, embed_dim=384, depth=12, num_heads=6), kwargs)


def video_vit_base_patch16_224(num_frames: int = 16, **kwargs) -> VideoVisionTransformer:
    """VideoMAE ViT-B/16 (dim 768, depth 12, 12 heads), tubelet 2×16×16, 224², Kinetics-400
    head by default (MCG-NJU/videomae-base-finetuned-kinetics). ``kwargs`` override any
    :class:`VideoVisionTransformer` argument."""
    return _create(num_frames, dict(patch_size=16, img_size=224, embed_dim=768, depth=12, num_heads=12), kwargs)


def video_vit_large_patch16_224(num_frames: int = 16, **kwargs) -> VideoVisionTransformer:
    """VideoMAE ViT-L/16 (dim 1024, depth 24, 16 heads), tubelet 2×16×16, 224², Kinetics-400
    head by default. ``kwargs`` override any :class:`VideoVisionTransformer` argument."""
    return _create(num_frames, dict(patch_size=16, img_size=224, embed_dim=1024, depth=24, num_heads=16), kwargs)

