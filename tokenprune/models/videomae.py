"""Load VideoMAE checkpoints into :class:`~tokenprune.models.VideoVisionTransformer`.

Two formats, told apart by their keys:

* Hugging Face transformers ``VideoMAEForVideoClassification`` (``videomae.embeddings...``,
  ``videomae.encoder.layer.{i}.attention.attention.query.weight``, ``...layernorm_before``,
  ``intermediate.dense``, ``output.dense``, ``fc_norm``, ``classifier``), as a state dict, a
  ``pytorch_model.bin`` / ``model.safetensors`` file (or a sharded index), or a
  ``save_pretrained`` directory. Both the old bias names (``attention.attention.q_bias`` /
  ``v_bias``, the hub checkpoints) and transformers ≥ 5's (``query.bias`` / ``value.bias``) load.
  A bare ``VideoMAEModel`` (no ``videomae.`` prefix) loads too.
* The original VideoMAE repository's ``.pth`` (``patch_embed.proj.weight``,
  ``blocks.{i}.attn.qkv.weight``, ``blocks.{i}.attn.q_bias`` / ``v_bias``, ``fc_norm``,
  ``head``), possibly nested under ``'module'`` / ``'model'`` / ``'state_dict'``.

VideoMAE learns q and v biases but no k bias; timm's ``Attention`` has one fused qkv bias, which
is loaded as (q_bias, 0, v_bias). A key bias would not change the attention output (softmax is
shift-invariant per query), but it would shift the keys themselves, so keeping it at zero keeps
the keys (ToMe's merge metric) identical to VideoMAE's.

Sin-cos position embeddings are fixed: the model computes its own for its grid and any stored
copy is dropped when it equals the formula. A learned embedding is resampled to the model's
grid with :func:`~tokenprune.models.video_vit.resize_pos_embed` (time linear, space bicubic).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .video_vit import VideoVisionTransformer, resize_pos_embed, sincos_pos_embed

__all__ = ["LoadResult", "load_videomae", "use_transformers_norm_eps", "videomae_config_from_transformers"]

# transformers' VideoMAE: its blocks' (and final) LayerNorms take the config's layer_norm_eps,
# default 1e-12; its fc_norm is a plain nn.LayerNorm, eps 1e-5.
_HF_LAYER_NORM_EPS = 1e-12
_HF_FC_NORM_EPS = 1e-5

_WRAPPER_KEYS = ("module", "model", "state_dict", "model_state")
_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_HF_LAYER_MAP = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_ORIG_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


class LoadResult(NamedTuple):
    """What :func:`load_videomae` did: the detected ``format`` ('transformers' or 'original'),
    and the model keys the checkpoint lacked / the mapped checkpoint keys the model lacks
    (both empty after a strict load)."""

    format: str
    missing_keys: list[str]
    unexpected_keys: list[str]


# ----------------------------------------------------------------------------- reading


def _read_file(path: str) -> dict[str, Any]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    # VideoMAE's training checkpoints also store the run's argparse.Namespace: a plain
    # attribute bag, allowed next to the tensors.
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ValueError(
                f"{path} holds objects other than tensors, so it cannot be read with weights_only=True; "
                "load it yourself (if you trust it) and pass its state dict instead"
            ) from error


def _read(path: str | os.PathLike) -> dict[str, Any]:
    path = os.fspath(path)
    if not os.path.isdir(path):
        return _read_file(path)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, name)):
            return _read_file(os.path.join(path, name))
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = os.path.join(path, index)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state: dict[str, Any] = {}
            for shard in shards:
                state.update(_read_file(os.path.join(path, shard)))
            return state
    raise FileNotFoundError(
        f"{path} holds no model.safetensors, pytorch_model.bin or sharded index (a save_pretrained directory)"
    )


def _unwrap(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """Strip training wrappers: {'model': {...}} / {'module': {...}} and DDP 'module.' prefixes."""
    while not any(isinstance(v, Tensor) for v in state.values()):
        inner = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            raise ValueError(f"no tensors found in the checkpoint; top-level keys: {sorted(state)}")
        state = inner
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def _detect(state: Mapping[str, Tensor]) -> str:
    keys = list(state)
    if any(k.startswith(("videomae.", "embeddings.patch_embeddings", "encoder.layer.")) for k in keys):
        return "transformers"
    if any(k.startswith(("patch_embed.", "blocks.", "encoder.patch_embed.", "encoder.blocks.")) for k in keys):
        return "original"
    raise ValueError(
        "cannot tell the checkpoint format: expected Hugging Face VideoMAE keys (videomae.encoder.layer.*) or "
        f"original VideoMAE keys (patch_embed.*, blocks.*); first keys: {keys[:8]}"
    )


# ----------------------------------------------------------------------------- key mapping


def _fuse_qkv(out: dict[str, Tensor], prefix: str, parts: dict[str, Tensor]) -> None:
    """Build ``{prefix}qkv.weight`` / ``.bias`` from separate q/k/v tensors; a missing bias
    part becomes zeros (VideoMAE has no k bias)."""
    weights = [parts.get(f"{name}.weight") for name in "qkv"]
    if all(w is not None for w in weights):
        out[f"{prefix}qkv.weight"] = torch.cat(weights)
    else:  # incomplete: keep what is there under its own name, so it is reported
        for name in "qkv":
            if parts.get(f"{name}.weight") is not None:
                out[f"{prefix}{name}.weight"] = parts[f"{name}.weight"]
    _fuse_bias(out, prefix, parts.get("q.bias"), parts.get("k.bias"), parts.get("v.bias"))


def _fuse_bias(out: dict[str, Tensor], prefix: str, q: Tensor | None, k: Tensor | None, v: Tensor | None) -> None:
    """(q, k, v) → ``{prefix}qkv.bias``; only k may be absent (zeros). With q or v absent the
    present parts stay under their own names, so a strict load reports them and the missing
    ``qkv.bias``."""
    if q is None and v is None:
        if k is not None:
            out[f"{prefix}k_bias"] = k
        return
    if q is None or v is None:
        for name, bias in (("q_bias", q), ("k_bias", k), ("v_bias", v)):
            if bias is not None:
                out[f"{prefix}{name}"] = bias
        return
    out[f"{prefix}qkv.bias"] = torch.cat([q, k if k is not None else torch.zeros_like(q), v])


def _map_transformers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    attention: dict[int, dict[str, Tensor]] = {}
    for key, value in state.items():
        name = key[len("videomae.") :] if key.startswith("videomae.") else key
        match = _HF_LAYER.match(name)
        if match:
            index, rest = int(match.group(1)), match.group(2)
            attn = re.match(r"^attention\.attention\.(query|key|value|q_bias|v_bias|k_bias)(?:\.(weight|bias))?$", rest)
            if attn:
                which, kind = attn.group(1), attn.group(2)
                letter = which[0]
                part = f"{letter}.bias" if which.endswith("_bias") else f"{letter}.{kind}"
                attention.setdefault(index, {})[part] = value
                continue
            for hf_name, ours in _HF_LAYER_MAP.items():
                if rest.startswith(hf_name + "."):
                    out[f"blocks.{index}.{ours}{rest[len(hf_name):]}"] = value
                    break
            else:
                out[f"blocks.{index}.{rest}"] = value  # unknown: reported as unexpected
            continue
        if name.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + name.rsplit(".", 1)[1]] = value
        elif name == "embeddings.position_embeddings":
            out["pos_embed"] = value
        elif name.startswith("layernorm."):
            out["norm." + name.split(".", 1)[1]] = value
        elif name.startswith("classifier."):
            out["head." + name.split(".", 1)[1]] = value
        else:  # fc_norm.* maps to itself; anything else is reported as unexpected
            out[name] = value
    for index, parts in sorted(attention.items()):
        _fuse_qkv(out, f"blocks.{index}.attn.", parts)
    return out


def _map_original(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # Pre-training checkpoints hold the encoder under 'encoder.' (next to the decoder).
    if any(k.startswith("encoder.patch_embed.") for k in state):
        state = {k[len("encoder.") :] if k.startswith("encoder.") else k: v for k, v in state.items()}
    out: dict[str, Tensor] = {}
    biases: dict[int, dict[str, Tensor]] = {}
    for key, value in state.items():
        match = _ORIG_BLOCK.match(key)
        if match:
            index, rest = int(match.group(1)), match.group(2)
            if rest in ("attn.q_bias", "attn.v_bias", "attn.k_bias"):
                biases.setdefault(index, {})[rest[5]] = value
                continue
            if rest in ("gamma_1", "gamma_2"):
                out[f"blocks.{index}.ls{rest[-1]}.gamma"] = value
                continue
        out[key] = value
    for index, parts in sorted(biases.items()):
        if f"blocks.{index}.attn.qkv.bias" in out:
            raise ValueError(f"blocks.{index}.attn has both a fused qkv.bias and separate q/v biases")
        _fuse_bias(out, f"blocks.{index}.attn.", parts.get("q"), parts.get("k"), parts.get("v"))
    return out


# ----------------------------------------------------------------------------- position embedding


def _infer_grid(num_positions: int, model_grid: tuple[int, int, int]) -> tuple[int, int, int]:
    """The (T, H, W) grid of a stored position embedding: the model's frame count with a square
    frame (VideoMAE fine-tunes other resolutions at the same clip length) or, for a model with
    non-square frames, with frames of the model's aspect ratio, or the model's frame size with
    another frame count. When readings fit and differ, the caller must say: a 9×16 table is
    also 12×12, and resampling it as such would scramble it silently.

    A table with the model's own token count is the model's grid and loads as it is (as in
    VideoMAE's fine-tuning script): on a non-square grid whose H'·W' is a square (every 16:9
    grid: 9×16 = 12²) the square reading would otherwise make a model refuse its own weights."""
    frames, height, width = model_grid
    if num_positions == frames * height * width:
        return frames, height, width
    readings = []
    if num_positions % frames == 0:
        side = round((num_positions // frames) ** 0.5)
        if side * side * frames == num_positions:
            readings.append((frames, side, side))
        # the model's aspect ratio h:w = a:b in lowest terms, scaled by k: k²·a·b per frame
        a, b = height // math.gcd(height, width), width // math.gcd(height, width)
        scale = round((num_positions // frames / (a * b)) ** 0.5)
        if frames * a * b * scale * scale == num_positions:
            readings.append((frames, scale * a, scale * b))
    if num_positions % (height * width) == 0:
        readings.append((num_positions // (height * width), height, width))
    readings = list(dict.fromkeys(readings))
    if len(readings) == 1:
        return readings[0]
    found = f"could be {' or '.join(map(str, readings))}" if readings else "fits neither"
    raise ValueError(
        f"a {num_positions}-entry position embedding {found} (T, H, W) for a model with grid {model_grid}; "
        "pass pos_embed_grid=(T, H, W)"
    )


def _fit_pos_embed(
    mapped: dict[str, Tensor], model: VideoVisionTransformer, pos_embed_grid: tuple[int, int, int] | None
) -> None:
    stored = mapped.get("pos_embed")
    if stored is None:
        return
    stored = stored.reshape(1, -1, stored.shape[-1])
    if not isinstance(model.pos_embed, torch.nn.Parameter):
        # The model's table is fixed and recomputed; drop a stored copy only when it is that same
        # formula (a saved sin-cos table), otherwise it is a learned embedding the model cannot use.
        fixed = sincos_pos_embed(stored.shape[1], stored.shape[-1], device=stored.device)
        # A half-precision copy differs from the float32 formula by its own rounding (≤ 4e-3 in bf16).
        tolerance = max(1e-4, 2 * torch.finfo(stored.dtype).eps) if stored.is_floating_point() else 1e-4
        if stored.shape == fixed.shape and torch.allclose(stored.float(), fixed, atol=tolerance):
            del mapped["pos_embed"]
        return
    grid = tuple(pos_embed_grid) if pos_embed_grid is not None else _infer_grid(stored.shape[1], model.grid_size)
    mapped["pos_embed"] = resize_pos_embed(stored, model.grid_size, grid)


# ----------------------------------------------------------------------------- public API


def load_videomae(
    model: VideoVisionTransformer,
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    *,
    strict: bool = True,
    pos_embed_grid: tuple[int, int, int] | None = None,
) -> LoadResult:
    """Load a VideoMAE checkpoint (Hugging Face or original format, detected from the keys) into
    ``model`` in place.

    Args:
        model: a :class:`VideoVisionTransformer` of the checkpoint's shape (for a Hugging Face
            config, build it with ``VideoVisionTransformer(**videomae_config_from_transformers(cfg))``).
        path_or_state_dict: a state dict, a ``.bin``/``.pth``/``.pt`` file (read with
            ``torch.load(weights_only=True)``), a ``.safetensors`` file, or a ``save_pretrained``
            directory.
        strict: raise a ValueError naming every missing and unexpected key (after mapping to
            this model's names). Shape mismatches always raise.
        pos_embed_grid: (T', H', W') of a learned position embedding in the checkpoint, when it
            cannot be inferred (inference keeps the model's frame count with square frames or
            frames of the model's aspect ratio, or its frame size; a tie asks for this).
    Returns:
        :class:`LoadResult` with the format and the missing / unexpected keys.
    """
    if isinstance(path_or_state_dict, Mapping):
        raw: Mapping[str, Any] = path_or_state_dict
    else:
        raw = _read(path_or_state_dict)
    state = _unwrap(raw)
    fmt = _detect(state)
    mapped = _map_transformers(state) if fmt == "transformers" else _map_original(state)
    _fit_pos_embed(mapped, model, pos_embed_grid)

    expected = model.state_dict()
    missing = [k for k in expected if k not in mapped]
    unexpected = [k for k in mapped if k not in expected]
    if strict and (missing or unexpected):
        lines = [f"the {fmt} VideoMAE checkpoint does not match the model:"]
        if missing:
            lines.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        # A bare key name does not say that the two position embeddings differ in kind, nor the fix.
        if "pos_embed" in unexpected:
            lines.append("the checkpoint's position embedding is learned (not VideoMAE's sin-cos table): build the "
                         "model with pos_embed='learned'")
        elif "pos_embed" in missing:
            lines.append("the checkpoint has no position embedding (VideoMAE's fixed sin-cos table): build the "
                         "model with pos_embed='sincos'")
        raise ValueError("\n".join(lines))
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in mapped.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if mismatched:
        raise ValueError("shape mismatch between the VideoMAE checkpoint and the model:\n" + "\n".join(mismatched))
    model.load_state_dict({k: v for k, v in mapped.items() if k in expected}, strict=False)
    return LoadResult(fmt, missing, unexpected)


def use_transformers_norm_eps(model: VideoVisionTransformer, checkpoint: str | os.PathLike) -> None:
    """Give ``model``'s LayerNorms, in place, the eps that transformers' VideoMAE uses with the
    weights of ``checkpoint`` (a Hugging Face file or ``save_pretrained`` folder): the
    ``layer_norm_eps`` of the ``config.json`` beside it (transformers' default 1e-12 where there
    is none) in the blocks and the final ``norm``, 1e-5 in ``fc_norm``. For a model built by a
    factory, whose eps (1e-6) is the original VideoMAE's, before it runs Hugging Face weights."""
    path = os.fspath(checkpoint)
    config_path = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "config.json")
    config: dict[str, Any] = {}
    if os.path.isfile(config_path):
        with open(config_path) as handle:
            config = json.load(handle)
    eps = float(config.get("layer_norm_eps", _HF_LAYER_NORM_EPS))
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = _HF_FC_NORM_EPS if name == "fc_norm" else eps


def _get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def videomae_config_from_transformers(config: Any) -> dict[str, Any]:
    """Keyword arguments for a :class:`VideoVisionTransformer` matching a transformers
    ``VideoMAEConfig`` (or its ``config.json`` as a dict).

    Hugging Face's blocks use ``layer_norm_eps`` (default 1e-12) but its ``fc_norm`` is a plain
    ``nn.LayerNorm`` (eps 1e-5); both are reproduced. ``use_mean_pooling=False`` maps to
    ``global_pool='token'`` (the first token after the final norm, as Hugging Face does).
    """
    act = _get(config, "hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"only hidden_act='gelu' (exact, erf) is supported, got {act!r}")
    hidden = int(_get(config, "hidden_size"))
    num_labels = _get(config, "num_labels")
    if num_labels is None:
        id2label = _get(config, "id2label")
        num_labels = len(id2label) if id2label else 2
    qkv_bias = _get(config, "qv_bias")
    if qkv_bias is None:
        qkv_bias = _get(config, "qkv_bias", True)
    image_size, patch_size = _get(config, "image_size", 224), _get(config, "patch_size", 16)
    intermediate = int(_get(config, "intermediate_size"))
    mlp_ratio = intermediate / hidden
    if int(hidden * mlp_ratio) != intermediate:  # timm sizes the MLP as int(dim * mlp_ratio)
        mlp_ratio = (intermediate + 0.5) / hidden
    return dict(
        img_size=tuple(image_size) if isinstance(image_size, (list, tuple)) else int(image_size),
        patch_size=tuple(patch_size) if isinstance(patch_size, (list, tuple)) else int(patch_size),
        num_frames=int(_get(config, "num_frames", 16)),
        tubelet_size=int(_get(config, "tubelet_size", 2)),
        in_chans=int(_get(config, "num_channels", 3)),
        num_classes=int(num_labels),
        global_pool="avg" if _get(config, "use_mean_pooling", True) else "token",
        embed_dim=hidden,
        depth=int(_get(config, "num_hidden_layers")),
        num_heads=int(_get(config, "num_attention_heads")),
        mlp_ratio=mlp_ratio,
        qkv_bias=bool(qkv_bias),
        pos_embed="sincos",
        layer_norm_eps=float(_get(config, "layer_norm_eps", _HF_LAYER_NORM_EPS)),
        fc_norm_eps=_HF_FC_NORM_EPS,
    )
