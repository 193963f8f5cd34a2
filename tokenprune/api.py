"""The public entry points: patch a model in place, undo it, and read what it did."""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from .merge import source_matrix
from .methods import METHODS, MethodConfig
from .patch import beit, cait, diff_attention, eva, naflexvit, parallel, qwen3_vit, sam, video, vit, vit_relpos  # noqa: F401 (importing a family's module registers it)

# An image or clip size ((H, W), (C, H, W), (T, H, W), an int), or NaFlex's packed patches (a dict).
InputSize = int | tuple[int, ...] | dict[str, Tensor]


def patch(model: nn.Module, method: str | MethodConfig | None = None, **options: Any) -> nn.Module:
    """Make ``model`` reduce tokens, in place, and return it.

    ``method`` is a registered name (``tokenprune.METHODS``) with its options as keywords, e.g.
    ``patch(model, r=16)``, or a config object, e.g. ``patch(model, ToMeConfig(r=(16, -1)))``.
    Without a method: the model's current method if it is patched, else its family's default:
    "tome", or "merge_unmerge" for SAM, whose blocks need every patch. On a model
    already patched with the same method, the keywords update its options (e.g. a new ``r``)
    and keep the others. All settings live on the model and its blocks: patched models never
    share state. A model that wraps a supported one (timm's Qwen3VitClassifier, a
    ``features_only=True`` backbone) is patched through it: its own forward runs the patched
    inner model, and ``patch`` returns the wrapper. So is a model inside ``torch.compile`` or
    ``DataParallel`` (Dynamo recompiles for the new class; DataParallel copies the model at every
    forward), and inside ``DistributedDataParallel`` unless the method adds parameters, which it
    would not synchronise (DynamicViT: patch, then wrap).
    """
    outer, model = model, vit.reducing_model(model)
    vit.check_own_classes(model)
    vit.check_supported(model)
    current = getattr(model, "tokenprune_config", None)
    implied = method is None
    if implied:
        method = next((name for name, cls in METHODS.items() if type(current) is cls), vit.family(model).default_method)
    if isinstance(method, str):
        if method not in METHODS:
            close = difflib.get_close_matches(method.lower(), METHODS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown method {method!r}; registered methods: {sorted(METHODS)}{hint}")
        config_class = METHODS[method]
        names = {f.name for f in dataclasses.fields(config_class)}
        if unknown := sorted(set(options) - names):
            source = "the model's current method" if current is not None else f"{vit.original_class(model).__name__}'s default"
            named = f"method {method!r}" + (f" ({source}, as none is named)" if implied else "")
            raise TypeError(
                f"{named} has no option {', '.join(unknown)}; its options: {sorted(names)}"
                + "".join(_option_hint(option, names, outer, model) for option in unknown)
            )
        if type(current) is config_class:
            config = dataclasses.replace(current, **options)
        else:
            _require_options(outer, model, method, config_class, options, implied)
            try:
                config = config_class(**options)
            except TypeError as error:
                raise TypeError(f"method {method!r}: {error}") from None
        _refuse_replaced_options(method, config, options)
    elif isinstance(method, type) or not callable(getattr(method, "reducers", None)):
        hint = "" if not isinstance(method, (int, tuple, list)) else f"; for ToMe's r, tokenprune.patch(model, r={method!r})"
        if name := next((name for name, cls in METHODS.items() if method is cls), None):
            given = ", ".join(f"{key}={value!r}" for key, value in options.items()) or "..."
            hint = f", a class: give an object, tokenprune.patch(model, {method.__name__}({given})), or the name {name!r}"
        raise TypeError(
            f"method must be a name in tokenprune.METHODS or a config object such as ToMeConfig(r=16), got "
            f"{method!r}{hint}"
        )
    else:
        if options:
            raise TypeError("give options either inside the config object or as keywords with a method name, not both")
        config = method
    vit.check_method_for(vit.unwrap_runtime(outer), config)
    vit.refuse_unsynchronised_parameters(outer, model, config)
    reducers = config.reducers(model)
    vit.check_reducers(model, config, reducers)
    if current is not None and type(current) is not type(config):
        vit.remove(model)
    vit.apply(model, config, reducers)
    vit.guard_wrappers(outer, True)
    return outer


def _refuse_replaced_options(method: str, config: Any, options: dict[str, Any]) -> None:
    """Raise for an option given that the settings leave unread (``config.replaced_options()``,
    where a config has it): given with the option that replaces it, or to a model patched with
    that one, whose other options ``patch`` keeps, it would change nothing without a word."""
    replaced = getattr(config, "replaced_options", dict)()
    for option, by in replaced.items():
        if option in options:
            raise ValueError(
                f"method {method!r}: {by}={getattr(config, by)!r} replaces {option}, so {option}={options[option]!r} "
                f"would change nothing; give one of them ({by}=None for {option})"
            )


def _option_hint(option: str, names: set[str], outer: nn.Module, model: nn.Module) -> str:
    """What an option a method lacks may have been meant as: a close name among ``names`` (a
    typo), or the methods that have it, of those the model can run (naming one it refuses, such
    as 'tome' for SAM's r, would send the user from this error to that refusal)."""
    if close := difflib.get_close_matches(option, names, n=1):
        return f"; did you mean {close[0]} for {option}?"
    owners = [name for name, cls in METHODS.items() if option in {f.name for f in dataclasses.fields(cls)}]
    if not owners:
        return ""
    methods = ", ".join(map(repr, owners))
    runnable = [name for name in owners if _runs_on(outer, model, METHODS[name])]
    if not runnable:
        return f"; {option} is an option of {methods}, which {vit.original_class(model).__name__} refuses"
    if runnable != owners:
        methods = ", ".join(map(repr, runnable))
        methods += f" here ({', '.join(repr(name) for name in owners if name not in runnable)} too, refused on this model)"
    return f"; {option} is an option of {methods}: name the method, e.g. tokenprune.patch(model, {runnable[0]!r}, {option}=...)"


# Values for the options a method cannot do without, to ask whether a model runs the method at all.
_PROBE_OPTIONS = {"r": 1, "ratio": 0.5}


def _runs_on(outer: nn.Module, model: nn.Module, config_class: type) -> bool:
    """Whether patching would refuse ``config_class`` for this model whatever its options: the
    checks ``patch`` runs, on the method's defaults. A TypeError there refuses the model's family
    or blocks (SAM, video, Qwen3, parallel blocks); anything else depends on the option values,
    which the user has yet to give, so it counts as runnable."""
    fields = dataclasses.fields(config_class)
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    try:
        config = config_class(**{name: _PROBE_OPTIONS[name] for name in required})
        vit.check_method_for(vit.unwrap_runtime(outer), config)
        # (reducers that would create parameters, DynamicViT's predictors, are not built for a hint)
        if not getattr(config, "adds_parameters", lambda _: False)(model):
            vit.check_reducers(model, config, config.reducers(model))
    except TypeError:
        return False
    except Exception:  # noqa: BLE001 (an option's value, or a required option with no probe value: cannot tell)
        return True
    return True


def _require_options(
    outer: nn.Module, model: nn.Module, method: str, config_class: type, options: dict[str, Any], implied: bool
) -> None:
    """Name an option the method cannot do without, with a value to start from: for ``r``,
    ToMe's rule of thumb, tokens / blocks at the model's own input size. The call it shows names
    the method unless patch chose it (``implied``): without the name, ``patch`` would run the
    model's default method (ToMe, where 'pitome' was asked for), or refuse the option."""
    fields = dataclasses.fields(config_class)
    missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in missing if name not in options]
    if not missing:
        return
    hint = ""
    probe = {name: _PROBE_OPTIONS[name] for name in missing if name in _PROBE_OPTIONS}
    if missing == ["r"] and (rule := _rule_of_thumb_r(model)) is not None:
        r, size, tokens = rule
        probe["r"] = r
        hint = f"; ToMe's rule of thumb, r ≈ tokens / blocks, gives {r} here ({tokens} tokens over {len(model.blocks)} blocks at {size})"
    if len(probe) == len(missing):
        # A method this model cannot run is refused for that, before its options are asked for.
        vit.check_method_for(vit.unwrap_runtime(outer), config_class(**options, **probe))
    named = "" if implied else f"{method!r}, "
    raise TypeError(f"method {method!r} needs {', '.join(missing)}: e.g. tokenprune.patch(model, {named}{missing[0]}=...){hint}")


def _rule_of_thumb_r(model: nn.Module) -> tuple[int, str, int] | None:
    """(tokens // blocks, the input size it is for, tokens) at the model's own input size (a
    clip's frames too); None where the model has none or the rule gives less than 1."""
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    if size is None:
        return None
    frames = getattr(embed, "num_frames", None)
    full = (frames, *size) if frames else tuple(size)
    try:
        tokens = input_tokens(model, full)
    except (TypeError, ValueError):  # a size this family does not plan
        return None
    r = tokens // len(model.blocks)
    return (r, "x".join(map(str, full)), tokens) if r >= 1 else None


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the model's original classes and behaviour exactly, in place, and return it."""
    inner = vit.reducing_model(model)
    if getattr(inner, "tokenprune_config", None) is None:
        if any(isinstance(module, vit.ReducingBlockMixin) for module in model.modules()):
            raise ValueError(
                f"this {type(model).__name__} is or holds a block of a model patched by tokenprune: unpatch that "
                "model (the one given to tokenprune.patch), which restores its blocks too"
            )
        raise ValueError("the model is not patched by tokenprune")
    vit.check_own_classes(inner)
    vit.remove(inner)
    vit.guard_wrappers(model, False)
    return model


def source(model: nn.Module) -> Tensor:
    """[B, T_out, T_in] 0/1 map from the last forward's output tokens to its input tokens (the
    prefix tokens included), as ToMe's ``source``. Needs ``trace_source=True``. The model keeps
    one map, its last forward's: where threads share the model (a server), take each call's own
    from ``model.forward_tokens(x, trace_source=True).source_index``
    (:func:`tokenprune.merge.source_matrix` makes the map of it)."""
    if any(isinstance(m, nn.DataParallel) and len(m.device_ids) > 1 for m in vit.runtime_chain(model)):
        raise RuntimeError(
            "no source map: DataParallel runs a copy of the model on each device, and each copy keeps its own; "
            "run the traced forward on the model without DataParallel"
        )
    inner = vit.reducing_model(model)
    config = getattr(inner, "tokenprune_config", None)
    if getattr(config, "unmerges_in_blocks", False):
        raise RuntimeError(
            f"no source map: {type(config).__name__} unmerges inside every block, so no merged token outlives its block"
        )
    traced = getattr(inner, "_tokenprune_source", None)
    if traced is None:
        if config is None and isinstance(inner, (torch.jit.ScriptModule, torch.fx.GraphModule)):
            # A recorded graph is no patched model: "patch ... and run a forward" would name what
            # its user already did to the model it came from.
            raise RuntimeError(
                f"no source map: {type(inner).__name__} replays a graph recorded from the model "
                "(torch.jit.trace, torch.export), which keeps no map; call tokenprune.source on the patched "
                "model itself after running it"
            )
        if getattr(config, "trace_source", False):
            raise RuntimeError(
                "no source map: no forward has run since patching, or the last one was told trace_source=False; "
                "run model(x) or model.forward_tokens(x) first"
            )
        raise RuntimeError("no source map: patch the model with trace_source=True and run a forward first")
    source_index, num_tokens = traced
    if source_index is None:
        raise RuntimeError(
            "no source map: the last forward ran under torch.func.vmap, whose per-sample maps cannot leave the "
            "transform; return model.forward_tokens(x, trace_source=True).source_index from the vmapped function "
            "(tokenprune.merge.source_matrix makes the map of it), or run the model outside vmap"
        )
    return source_matrix(source_index, num_tokens)


@dataclass(frozen=True)
class ReductionPlan:
    """Token counts of a (patched or plain) model for one input size.

    tokens[i] is the token count entering block i; removed[i] is how many block i removes
    (the effective r, after capping); added_after_blocks counts the prefix tokens that join
    after the blocks (CaiT's class token)."""

    tokens: tuple[int, ...]
    removed: tuple[int, ...]
    added_after_blocks: int = 0

    @property
    def output_tokens(self) -> int:
        """Tokens leaving the last block."""
        return self.tokens[-1] - self.removed[-1]

    @property
    def head_tokens(self) -> int:
        """Tokens reaching the head (``forward_tokens``' count)."""
        return self.output_tokens + self.added_after_blocks

    def tokens_after(self, block: int) -> int:
        """Tokens leaving block ``block``."""
        return self.tokens[block] - self.removed[block]


def patch_grid(model: nn.Module, input_size: InputSize) -> tuple[int, ...]:
    """The token grid for an input of ``input_size``: (rows, cols) for an image ((H, W),
    (C, H, W) or an int); (frames, rows, cols) for a video model, whose ``input_size`` is
    (T, H, W), (C, T, H, W), (H, W) or an int (then T is the model's ``num_frames``); (N,) for
    NaFlex's packed patches (the dict itself: sequences of N positions)."""
    model = vit.reducing_model(model)
    _check_input_size(input_size)
    if isinstance(input_size, dict):
        packed_grid = getattr(vit.family(model), "packed_grid", None)
        if packed_grid is None:
            raise ValueError(f"{type(model).__name__} takes image or clip sizes, not packed patches (NaFlexVit's input)")
        return packed_grid(model, input_size)
    if video.is_video_model(model):
        return _video_grid(model, input_size)
    if not isinstance(input_size, Integral) and len(input_size) == 4:
        raise ValueError(
            f"{vit.original_class(model).__name__} is an image model: input_size is (H, W) or (C, H, W); got "
            f"{tuple(input_size)}, four sizes as a clip's (C, T, H, W) (for a batch's x.shape, give x.shape[-2:])"
        )
    if isinstance(input_size, Integral):
        height = width = input_size
    else:
        height, width = input_size[-2:]
    return vit.family(model).image_grid(model, height, width)


def _check_input_size(input_size: InputSize) -> None:
    """A positive int, or 2 to 4 of them (or NaFlex's dict): not a tensor, a string, or a size
    that would plan a negative grid."""
    if isinstance(input_size, dict):
        return
    sizes: tuple = ()
    if isinstance(input_size, Integral):
        sizes = (input_size,)
    elif isinstance(input_size, (tuple, list)) and 2 <= len(input_size) <= 4:
        sizes = tuple(input_size)
    if sizes and all(isinstance(n, Integral) and not isinstance(n, bool) and n > 0 for n in sizes):
        return
    given = f"a tensor of shape {tuple(input_size.shape)}" if isinstance(input_size, Tensor) else repr(input_size)
    raise ValueError(
        "input_size must be a positive int or a tuple of them: (H, W) or (C, H, W) for images, (T, H, W) or "
        f"(C, T, H, W) for video; got {given}"
    )


def _video_grid(model: nn.Module, input_size: int | tuple[int, ...]) -> tuple[int, int, int]:
    embed = model.patch_embed
    if isinstance(input_size, Integral):
        frames, height, width = embed.num_frames, input_size, input_size
    elif len(input_size) == 2:
        frames, (height, width) = embed.num_frames, input_size
    else:
        frames, height, width = input_size[-3:]
    if not getattr(model, "dynamic_img_size", False) and (frames, height, width) != (embed.num_frames, *embed.img_size):
        raise ValueError(
            f"the model takes {embed.num_frames} frames of {embed.img_size[0]}x{embed.img_size[1]}, not {frames} "
            f"frames of {height}x{width}; create it with dynamic_img_size=True for other clip sizes"
        )
    embed.check_clip_size(frames, height, width)  # as the forward does, rather than planning a floored grid
    t, h, w = embed.dynamic_feat_size((frames, height, width))
    return (int(t), int(h), int(w))


def input_tokens(model: nn.Module, input_size: InputSize) -> int:
    """Tokens entering the first block for an input of ``input_size`` (prefix + patches, or
    prefix + T'·H'·W' tubelets for video; CaiT's blocks see the patches alone)."""
    return vit.block_prefix_tokens(vit.reducing_model(model)) + math.prod(patch_grid(model, input_size))


def plan(model: nn.Module, input_size: InputSize) -> ReductionPlan:
    """The per-block token counts the model will use for ``input_size`` (effective schedule;
    NaFlexVit: or packed patches, see :func:`patch_grid`). Counts are those of inference:
    DynamicViT in ``train()`` keeps dropped tokens in place, masked, and computes on all of them."""
    model = vit.reducing_model(model)
    grid = patch_grid(model, input_size)
    count = input_tokens(model, input_size)
    tokens, removed = [], []
    for i, block in enumerate(model.blocks):
        reducer = getattr(block, "reducer", None)
        gone = reducer.num_removed(count, grid) if reducer is not None else 0
        if gone is None:
            raise ValueError(
                f"block {i} reduces by a data-dependent count (adaptive/threshold option), so the plan depends "
                "on the images; use the fixed-count options for a static plan and FLOPs"
            )
        tokens.append(count)
        removed.append(gone)
        count -= gone
    added = getattr(model, "num_prefix_tokens", 0) - vit.block_prefix_tokens(model)
    return ReductionPlan(tuple(tokens), tuple(removed), added)
