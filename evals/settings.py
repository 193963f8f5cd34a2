"""What a method runs at: its options, given directly or found for a budget.

Shared by the benchmark and the eval scripts, so that a setting has one name everywhere
(:func:`describe_setting`, the key that joins speed and quality results) and the same command
line (:func:`add_arguments`, :func:`settings_from_args`).

**Budgets** compare methods at equal cost. A method's strength is one option, its **knob**:
``r`` for the merging methods, ``keep_ratio`` for the dropping methods, ``early_r`` for video
background merging. Its settings are listed from the weakest (r=0 or ρ=1; two-stage merging's
first setting already merges its windows) to the strongest,
one step apart (one token of ``r``, 0.01 of ``keep_ratio``). Two-stage merging
(``local_global``) also moves its window stage with the budget, earlier for tighter budgets
(:data:`LOCAL_GLOBAL_PLACEMENT`), unless ``local_block`` is given; temporal merging turns the
early r of background merging's front-loaded schedule (a per-block list: heavy early blocks,
then background merging's later r), as background merging turns its ``early_r``. A budget is

* a **GFLOPs fraction** (``0.5``, or ``50%``): the weakest setting whose GFLOPs per image are
  at most that fraction of the unreduced model's, from :func:`tokenprune.flops` — exact and
  deterministic, so every script that searches the same budget picks the same setting;
* a **speedup** (``2x``): the weakest setting whose measured throughput is at least that
  multiple of the unreduced model's, timed on the machine at hand.

Either cost falls as the knob turns (FLOPs exactly, time up to noise), so the search is a
bisection: the setting it returns meets the budget and the one a step weaker does not.

For the methods whose knob is ``r`` the search can keep a **schedule shape**: with an
``inflection`` it searches ``r`` of ToMe's linear schedule ``(r, inflection)`` (``-1``: the
paper's decreasing schedule) instead of a constant ``r``, so that methods can be compared at
equal GFLOPs and with equally front-loaded merging.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import decimal
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

import tokenprune
from tokenprune.api import input_tokens
from tokenprune.methods.temporal import BackgroundMergeConfig, default_early_blocks
from tokenprune.patch.vit import block_prefix_tokens, reducing_model
from tokenprune.schedule import RSchedule, format_schedule, parse_schedule, resolve_r

__all__ = [
    "DEFAULT_SETTINGS",
    "KNOBS",
    "Budget",
    "BudgetUnreachable",
    "Knob",
    "Setting",
    "add_arguments",
    "apply",
    "bisect_weakest",
    "default_settings_text",
    "describe_setting",
    "identity",
    "method_options",
    "method_takes",
    "parse_budget",
    "parse_gflops_budget",
    "resolve",
    "setting_for_budget",
    "settings_from_args",
    "unreachable_row",
]


def method_takes(method: str, option: str) -> bool:
    """Whether the method's config has ``option`` (e.g. the dropping methods have no backend)."""
    return option in {f.name for f in dataclasses.fields(tokenprune.METHODS[method])}


class BudgetUnreachable(ValueError):
    """A method's strongest setting still misses the budget."""


@dataclass(frozen=True)
class Knob:
    """The option that sets a method's strength, and its settings, weakest first.

    ``ladder``, when a method has one, replaces the plain list of settings for a budget
    search: given the model, input size and the options already fixed, it returns the options
    each step sets (weakest first, GFLOPs falling), or ``None`` to fall back to ``settings``."""

    option: str
    settings: Callable[[nn.Module, tuple[int, ...]], Sequence[Any]]
    ladder: Callable[[nn.Module, tuple[int, ...], dict[str, Any]], list[dict[str, Any]] | None] | None = None

    def steps(
        self, model: nn.Module, size: tuple[int, ...], options: dict[str, Any], inflection: float | None = None
    ) -> Sequence[dict[str, Any]]:
        """The options each setting of a budget search sets, weakest first; with an
        ``inflection`` (knob ``r`` only) each step is the schedule ``(r, inflection)``, and a
        ladder, which places its own schedule, is not used."""
        if inflection is not None:
            if self.option != "r":
                raise ValueError(f"an inflection shapes an r schedule, and this method's budget knob is {self.option}")
            resolve_r((0, inflection), 1)  # a NaN, bool or out-of-range inflection, named as patch names it
            return _RampSteps(_ramp_r_settings(model, size, inflection), inflection)
        steps = self.ladder(model, size, options) if self.ladder is not None else None
        if steps is None:
            steps = [{self.option: value} for value in self.settings(model, size)]
        return steps


def _r_settings(model: nn.Module, size: tuple[int, ...]) -> Sequence[int]:
    # r beyond half the patch tokens merges nothing more (ToMe caps r at half the tokens).
    patches = input_tokens(model, size) - block_prefix_tokens(reducing_model(model))
    return range(0, patches // 2 + 1)


def _ramp_r_settings(model: nn.Module, size: tuple[int, ...], inflection: float) -> Sequence[int]:
    """r of the ramp ``(r, inflection)``, from 0 until every block the ramp reaches at all asks
    for half the patch tokens (more merges nothing more). A ramp asks ``r·c`` of a block, c running
    linearly from 1 − inflection (first block) to 1 + inflection (last), so a ramp whose early,
    token-rich blocks ask little (inflection > 0) keeps reducing past r = half the tokens:
    stopping there, as a constant r may, would call budgets unreachable that a larger r meets."""
    half = max(_r_settings(model, size))
    depth = len(reducing_model(model).blocks)
    steps = [i / (depth - 1) for i in range(depth)] if depth > 1 else [0.5]
    smallest = min(c for c in ((1.0 - inflection) + 2.0 * inflection * t for t in steps) if c > 0)
    # + 2: the ramp truncates twice. An inflection a hair off ±1 asks for a vast ladder (0.99:
    # 100 · half), which the bisection reads in log2 steps (_RampSteps makes only those); the
    # ladder ends where a range's len() does.
    return range(min(max(half, math.ceil((half + 2) / smallest)), sys.maxsize - 1) + 1)


@dataclass(frozen=True)
class _RampSteps(Sequence):
    """The steps ``{"r": (r, inflection)}`` for the r of ``values``, made as they are read."""

    values: range
    inflection: float

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        return {"r": (self.values[index], self.inflection)}


def _keep_ratio_settings(model: nn.Module, size: tuple[int, ...]) -> Sequence[float]:
    return [round(1.0 - step / 100, 2) for step in range(100)]  # 1.00, 0.99, ..., 0.01


def _merge_ratio_settings(model: nn.Module, size: tuple[int, ...]) -> Sequence[float]:
    return [step / 100 for step in range(51)]  # 0.00, 0.01, ..., 0.50 (bipartite matching's cap)


# Where two-stage merging puts its window stage, and the shape of its later r, for a GFLOPs
# budget: (lowest GFLOPs fraction, local_block, inflection of r). The tighter the budget, the
# earlier the window stage, so that no later block has to merge too much. Measured with
# ``python -m evals.dense_fidelity`` (DINOv2 ViT-S/14, 12 blocks): of the two-stage settings
# tried, those that kept the embedding and the saliency map closest to the unreduced model at
# each budget (``evals/results/dense_fidelity.md``).
LOCAL_GLOBAL_PLACEMENT = ((0.70, 3, -0.5), (0.62, 2, -0.5), (0.54, 1, -0.5), (0.50, 0, -0.5), (0.0, 0, -1))


def _local_global_ladder(model: nn.Module, size: tuple[int, ...], options: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Budget steps for ``local_global``: r with the window stage placed by the budget
    (:data:`LOCAL_GLOBAL_PLACEMENT`); ``None`` (search r alone) when ``local_block`` is given
    or the model is too shallow for the table.

    A band whose window stage cannot bring the GFLOPs down to the band's floor (a shallow
    model: a 6-block ViT-Ti at 224² keeps at least 84 % with its window stage after block 3,
    two blocks left to merge) hands over to the next band where it stops, not at the floor:
    otherwise no step would fall between the two, and every budget there would get the next
    band's top (that ViT-Ti: 62 % of the GFLOPs for a budget of 80 %)."""
    depth = len(reducing_model(model).blocks)
    if "local_block" in options or depth <= max(block for _, block, _ in LOCAL_GLOBAL_PLACEMENT) + 1:
        return None
    candidate = _copy_unpatched(model)
    unreduced = tokenprune.flops(model, size).total
    steps: list[tuple[float, dict[str, Any]]] = []
    highest = float("inf")
    for lowest, block, inflection in LOCAL_GLOBAL_PLACEMENT:
        fractions = []
        for r in _r_settings(model, size):
            step = {"r": (r, inflection), "local_block": block}
            patched = tokenprune.patch(candidate, "local_global", **{**options, **step})
            fractions.append(tokenprune.flops(patched, size).total / unreduced)
            if lowest <= fractions[-1] < highest:
                steps.append((fractions[-1], step))
        # The next band starts at this band's floor, or higher where this band's block stops short of it.
        highest = max(lowest, min([highest, *fractions]))
    return [step for _, step in sorted(steps, key=lambda item: -item[0])]


def _temporal_ladder(model: nn.Module, size: tuple[int, ...], options: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Budget steps for ``temporal``: background merging's shape of schedule as a per-block r,
    ``[x] * early + [later] * rest`` (its early blocks and later r,
    :class:`tokenprune.BackgroundMergeConfig`), x turning. Measured with
    ``python -m evals.video_fidelity`` (24 real clips, ``evals/results/video_fidelity.md``): at
    50 and 45 % of the GFLOPs it keeps the token features closer than joint ToMe's constant r
    (+0.0024 and +0.0067), which temporal merging at a constant r only tied. ``None`` (a
    constant r) for a model too shallow to split."""
    depth = len(reducing_model(model).blocks)
    if depth < 2:
        return None
    early = default_early_blocks(depth)
    later = [BackgroundMergeConfig.r] * (depth - early)
    return [{"r": [x] * early + later} for x in _r_settings(model, size)]


R_KNOB = Knob("r", _r_settings)
KEEP_RATIO_KNOB = Knob("keep_ratio", _keep_ratio_settings)

# One entry per registered method (tokenprune.METHODS); a test keeps the two in step.
KNOBS: dict[str, Knob] = {
    "tome": R_KNOB,
    "pitome": R_KNOB,
    "local_global": Knob("r", _r_settings, _local_global_ladder),  # r, and where stage 1 goes
    "temporal": Knob("r", _r_settings, _temporal_ladder),  # front-loaded, like background merging
    # Background merging's defining step is the early one; its later ToMe r stays as given (48).
    "background": Knob("early_r", _r_settings),
    "dynamicvit": KEEP_RATIO_KNOB,
    "evit": KEEP_RATIO_KNOB,
    "merge_unmerge": Knob("ratio", _merge_ratio_settings),  # of every attention group's tokens
}


@dataclass(frozen=True)
class Budget:
    """A cost target: ``kind`` "gflops" (``value`` = fraction of the unreduced GFLOPs) or
    "speedup" (``value`` = throughput multiple of the unreduced model)."""

    kind: str
    value: float

    @property
    def label(self) -> str:
        """``"50% GFLOPs"`` or ``"2x speed"``: how results and messages name the budget."""
        return f"{self.value:g}x speed" if self.kind == "speedup" else f"{self.value * 100:g}% GFLOPs"

    def __str__(self) -> str:
        return self.label


def parse_budget(text: str) -> Budget:
    """``0.5`` or ``50%`` → half the GFLOPs; ``2x`` → twice the throughput."""
    spec = text.strip().lower()
    try:
        if spec.endswith("x"):
            value = float(spec[:-1])
            if not (math.isfinite(value) and value > 1.0):  # "nanx" is not above 1, nor below; "infx" never met
                raise ValueError
            return Budget("speedup", value)
        # A percentage shifted in decimal, not divided as a float: 33.3 / 100 is 0.33299999999999996,
        # a budget apart from "0.333" under one label, which a sweep then ran twice.
        value = float(decimal.Decimal(spec[:-1]) / 100) if spec.endswith("%") else float(spec)
    except (ValueError, decimal.InvalidOperation):
        raise argparse.ArgumentTypeError(
            f"budget {text!r}: give a GFLOPs fraction in (0, 1) such as 0.5 or 50%, or a speedup above 1 such as 2x"
        ) from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"budget {text!r}: a GFLOPs fraction must be in (0, 1), e.g. 0.5 or 50%")
    return Budget("gflops", value)


def parse_gflops_budget(text: str) -> Budget:
    """:func:`parse_budget` for the eval scripts, whose budgets must be GFLOPs fractions: they
    time nothing a speedup could be searched against."""
    budget = parse_budget(text)
    if budget.kind != "gflops":
        raise argparse.ArgumentTypeError("an eval takes a GFLOPs fraction (0.5 or 50%); speedups are for evals.bench")
    return budget


def bisect_weakest(meets: Callable[[int], bool], count: int) -> int | None:
    """The smallest index in ``range(count)`` for which ``meets`` holds, for a ``meets`` that is
    false and then true along the range; ``None`` if it never holds. log2(count) calls."""
    if count < 1 or not meets(count - 1):
        return None
    low, high = 0, count - 1  # invariant: meets(high); every index below low fails
    while low < high:
        middle = (low + high) // 2
        if meets(middle):
            high = middle
        else:
            low = middle + 1
    return high


def setting_for_budget(
    model: nn.Module,
    method: str,
    options: dict[str, Any],
    budget: Budget,
    size: tuple[int, ...],
    speedup_of: Callable[[nn.Module], float] | None = None,
    inflection: float | None = None,
) -> dict[str, Any]:
    """``options`` with ``method``'s knob set to the weakest setting that meets ``budget``
    (for knob ``r`` with an ``inflection``: the weakest schedule ``(r, inflection)``).

    ``model`` is an unpatched model (left unpatched); ``size`` its input size, (H, W) or
    (T, H, W). A speedup budget needs ``speedup_of``, which times a patched copy against the
    unreduced model and returns the ratio. Raises :class:`BudgetUnreachable` when the method's
    strongest setting still misses the budget, naming what it reaches."""
    if method not in KNOBS:
        raise ValueError(f"method {method!r} has no budget knob; knobs exist for {sorted(KNOBS)}")
    knob = KNOBS[method]
    if knob.option in options:
        raise ValueError(f"{method}: give either a budget or {knob.option}, not both")
    try:
        steps = knob.steps(model, size, options, inflection)
    except (TypeError, ValueError) as error:  # e.g. a data-dependent option plan() cannot count
        raise ValueError(f"{method}: cannot search a budget with these options: {error}") from None
    candidate = _copy_unpatched(model)
    unreduced = tokenprune.flops(model, size).total

    def patched(index: int) -> nn.Module:
        return tokenprune.patch(candidate, method, **{**options, **steps[index]})

    def gflops_fraction(index: int) -> float:
        return tokenprune.flops(patched(index), size).total / unreduced

    # Speedups as the search timed them: the error names the one that failed, not a new timing,
    # which on a noisy machine could pass the budget the search found missed.
    speedups: dict[int, float] = {}

    def timed_speedup(index: int) -> float:
        speedups[index] = speedup_of(patched(index))  # type: ignore[misc]
        return speedups[index]

    if budget.kind == "gflops":
        meets: Callable[[int], bool] = lambda index: gflops_fraction(index) <= budget.value  # noqa: E731
    elif speedup_of is None:
        raise ValueError(f"a {budget} budget is timed by evals.bench; here give a GFLOPs budget (0.5 or 50%)")
    else:
        meets = lambda index: timed_speedup(index) >= budget.value  # noqa: E731
    try:
        index = bisect_weakest(meets, len(steps))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{method}: cannot search a budget with these options: {error}") from None
    if index is None:
        strongest = describe_setting(method, steps[-1]) if steps else "none"
        reached = f"{gflops_fraction(len(steps) - 1):.1%} of the GFLOPs" if steps else "nothing"
        if budget.kind == "speedup" and steps:
            reached = f"{speedups[len(steps) - 1]:.2f}x"
        easier = "a larger GFLOPs share" if budget.kind == "gflops" else "a smaller speed-up"
        raise BudgetUnreachable(
            f"{method} cannot reach {budget}: its strongest setting ({strongest}) reaches {reached}; "
            f"give {easier} or options that let it reduce more"
        )
    return {**options, **steps[index]}


def _copy_unpatched(model: nn.Module) -> nn.Module:
    if getattr(reducing_model(model), "tokenprune_config", None) is not None:
        raise ValueError("pass the unpatched model: the budget is relative to its GFLOPs and speed")
    return copy.deepcopy(model)


def describe_setting(method: str, options: dict[str, Any]) -> str:
    """A short, canonical label of a method's options, e.g. ``"r=16"`` or ``"keep_ratio=0.7,
    stages=(3, 6, 9)"``: the knob first, then the other options sorted by name. Scripts use it
    as the key that joins one method setting's results across files."""
    if method == "none":
        return ""
    knob = KNOBS[method].option if method in KNOBS else None
    # The backend changes where the work runs, not what the setting computes: results of one
    # setting on different backends join under one name (bench reports the backend apart).
    names = sorted((name for name in options if name != "backend"), key=lambda name: (name != knob, name))
    return ", ".join(f"{name}={_format(name, options[name])}" for name in names)


def _format(name: str, value: Any) -> str:
    if name == "r" and isinstance(value, (int, tuple, list)):
        return format_schedule(value)  # 16, (16,-1), [8,8,4]
    if dataclasses.is_dataclass(value):
        return type(value).__name__
    return repr(value) if isinstance(value, str) else str(value)


# ---------------------------------------------------------------------------------------------
# Command line


@dataclass(frozen=True)
class Setting:
    """One reduction to run: a method with its options, to be completed by a budget search
    when ``budget`` is set; method "none" is the unpatched model."""

    method: str
    options: dict[str, Any]
    budget: Budget | None = None
    inflection: float | None = None  # search r of (r, inflection) for the budget (knob r only)


# A method's settings when neither its knob's values nor a budget are given.
DEFAULT_SETTINGS: dict[str, list[Any]] = {
    "r": [8, 13, 16, (16, -1)],
    "keep_ratio": [0.9, 0.7, 0.5],
    "early_r": [64, 128, 192],
    "ratio": [0.25, 0.4, 0.5],
}


def _option(text: str) -> tuple[str | None, str, Any]:
    """``[METHOD.]KEY=VALUE`` → (method or None, key, value read as a Python literal)."""
    target, sep, value = text.partition("=")
    method, dot, key = target.strip().rpartition(".")
    if not sep or not key.isidentifier() or (dot and method not in tokenprune.METHODS):
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE or METHOD.KEY=VALUE (METHOD in {sorted(tokenprune.METHODS)}), got {text!r}"
        )
    try:
        parsed = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        parsed = value.strip()  # a plain string, e.g. score=random
    return (method or None), key, parsed


def parse_option(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as a Python literal (``16``, ``(16, -1)``, ``True``,
    ``None``, ``0.5``); anything that is not a literal stays a string (``backend=torch``)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected key=value with a Python identifier as key, got {text!r}")
    try:
        return key, ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        return key, value.strip()


def method_options(method: str, pairs: Sequence[tuple[str, Any]], **flags: Any) -> dict[str, Any]:
    """One method's options from a script's command line: its ``--option key=value`` ``pairs``
    and its own flags (``r=args.r``...; None: not given). A key given twice, or both ways, and
    options for ``method="none"`` are errors."""
    options: dict[str, Any] = {}
    for key, value in pairs:
        if key in options:
            raise SystemExit(f"--option {key} given twice")
        options[key] = value
    for key, value in flags.items():
        if value is not None:
            if key in options:
                raise SystemExit(f"give {key} either as --{key.replace('_', '-')} or as --option {key}=..., not both")
            options[key] = value
    if method == "none" and options:
        raise SystemExit(f"--method none takes no options, got {sorted(options)}")
    return options


def _schedule(text: str) -> RSchedule:
    try:
        return parse_schedule(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def default_settings_text(knob: str) -> str:
    """:data:`DEFAULT_SETTINGS` of a knob as the command line takes them: "8 13 16 16,-1"."""
    return " ".join(format_schedule(v).strip("()") if knob == "r" else str(v) for v in DEFAULT_SETTINGS[knob])


def add_arguments(
    parser: argparse.ArgumentParser,
    default_method: str = "tome",
    timed: bool = False,
    defaults: dict[str, str] | None = None,
) -> None:
    """``--method``, ``--r``, ``--keep-ratio``, ``--early-r``, ``--ratio``, ``--budget`` and ``--option``, all repeatable, and
    ``--inflection``. ``timed``: the script times models, so a budget may be a speedup. ``defaults``:
    what the help says of a script's own defaults, by option (``{"r": "4 8 16,-1"}``), where
    the script sets them after parsing instead of :data:`DEFAULT_SETTINGS`."""
    said = {"method": default_method, **{knob: default_settings_text(knob) for knob in DEFAULT_SETTINGS}, **(defaults or {})}

    def default(name: str) -> str:
        return f" (default: {said[name]})" if name in said else ""

    add = parser.add_argument
    add("--method", action="append", choices=sorted(tokenprune.METHODS), help="method, repeatable" + default("method"))
    add("--r", action="append", type=_schedule, metavar="R",
        help="r for the merging methods, repeatable: 16, 16,-1 or a per-block list" + default("r"))  # fmt: skip
    add("--keep-ratio", action="append", type=float, metavar="RHO",
        help="keep ratio for the dropping methods, repeatable" + default("keep_ratio"))  # fmt: skip
    add("--early-r", action="append", type=int, metavar="N",
        help="early merges per block for background merging, repeatable" + default("early_r"))  # fmt: skip
    add("--ratio", action="append", type=float, metavar="X",
        help="fraction of each attention group merged by merge_unmerge (SAM), repeatable" + default("ratio"))  # fmt: skip
    add("--budget", action="append", type=parse_budget if timed else parse_gflops_budget,
        help="a cost every method is set to meet, repeatable: a GFLOPs fraction (0.5 or 50%%)"
             + (" or a speedup (2x)" if timed else "") + default("budget"))  # fmt: skip
    add("--inflection", type=float, metavar="X",
        help="with --budget, the methods whose knob is r search r of the schedule (r, X) instead of a constant r "
             "(X in [-1, 1]; -1: ToMe's decreasing schedule); the other methods' searches are unchanged")  # fmt: skip
    add("--option", action="append", default=[], type=_option, metavar="[METHOD.]KEY=VALUE",
        help="another method option, repeatable; without METHOD. it applies to every method that has it")  # fmt: skip
    parser.set_defaults(default_method=default_method)


def settings_from_args(args: argparse.Namespace) -> list[Setting]:
    """Every method's settings, in order: its knob's values, then the budgets. A method with
    neither gets :data:`DEFAULT_SETTINGS` for its knob."""
    methods = list(dict.fromkeys(args.method or [args.default_method]))
    options: dict[str, dict[str, Any]] = {method: {} for method in methods}
    for target, key, value in args.option:
        if target and target not in methods:
            raise SystemExit(f"--option {target}.{key}: {target} is not among the methods {methods}")
        targets = [target] if target else methods
        takers = [m for m in targets if method_takes(m, key)]
        if not takers:
            raise SystemExit(f"--option {key}: no option {key!r} in method(s) {targets}")
        for method in takers:
            options[method][key] = value
    values_of = {"r": args.r, "keep_ratio": args.keep_ratio, "early_r": args.early_r, "ratio": args.ratio}
    for knob, values in values_of.items():
        takers = [m for m in tokenprune.METHODS if KNOBS[m].option == knob]
        if values is not None and not set(takers) & set(methods):
            raise SystemExit(
                f"--{knob.replace('_', '-')} sets the strength of {', '.join(takers)}, and none of the methods "
                f"{methods} takes it; give their own knob, or another option with --option METHOD.{knob}=VALUE"
            )
    inflection = getattr(args, "inflection", None)
    if inflection is not None:
        if not args.budget:
            raise SystemExit("--inflection shapes the r that a budget search finds: give --budget too")
        if not -1.0 <= inflection <= 1.0:
            raise SystemExit(f"--inflection must be in [-1, 1] (-1: decreasing, 0: constant), got {inflection}")
    settings = []
    for method in methods:
        knob = KNOBS[method].option
        if knob in options[method]:
            raise SystemExit(f"give {method}'s {knob} with --{knob.replace('_', '-')}, not --option")
        values = values_of[knob]
        if values is None and not args.budget:
            values = DEFAULT_SETTINGS[knob]
        # A value or budget given twice (``--r 8 --r 8``, ``--budget 0.5 --budget 50%``) runs once:
        # two rows of one name would be timed twice, and evals.pareto would keep the faster draw.
        values = list({_format(knob, value): value for value in values or []}.values())
        settings += [Setting(method, {knob: value, **options[method]}) for value in values]
        shape = inflection if knob == "r" else None
        settings += [Setting(method, dict(options[method]), budget, shape) for budget in dict.fromkeys(args.budget or [])]
    return settings


def resolve(
    setting: Setting,
    model: nn.Module,
    size: tuple[int, ...],
    speedup_of: Callable[[nn.Module], float] | None = None,
) -> dict[str, Any]:
    """The options to patch ``model`` with: ``setting``'s, with the knob searched for its
    budget if it has one. :class:`BudgetUnreachable` propagates (a sweep skips that row and
    says so); other errors become ``SystemExit`` with the reason."""
    if setting.budget is None:
        return dict(setting.options)
    try:
        return setting_for_budget(
            model, setting.method, setting.options, setting.budget, size, speedup_of, setting.inflection
        )
    except BudgetUnreachable:
        raise
    except ValueError as error:
        raise SystemExit(str(error)) from None


def apply(setting: Setting, model: nn.Module, size: tuple[int, ...]) -> dict[str, Any]:
    """Patch ``model`` for ``setting`` (undoing any earlier patch first, since budgets are
    searched on the unpatched model) and return the options it used; method "none" leaves
    the model unpatched. A GFLOPs budget only: speed budgets need :mod:`evals.bench`'s timer."""
    if getattr(reducing_model(model), "tokenprune_config", None) is not None:
        tokenprune.unpatch(model)
    options = resolve(setting, model, size)
    if setting.method != "none":
        tokenprune.patch(model, setting.method, **options)
    return options


def check_static_plans(setting_list: Sequence[Setting], model: nn.Module, size: tuple[int, ...], hint: str) -> None:
    """Stop on a setting that ``model`` refuses or whose token counts depend on the data
    (local_global's ``adaptive`` or ``local_threshold``: no plan, no GFLOPs), naming it and
    ``hint``; a sweep calls this before its forward passes, since stopping at that setting's
    turn would lose every row measured before it. Leaves ``model`` unpatched."""
    for setting in setting_list:
        options = dict(setting.options)
        try:
            options = apply(setting, model, size)
            tokenprune.plan(model, size)
        except BudgetUnreachable:
            continue  # (the sweep gives it its row)
        except (TypeError, ValueError) as error:
            raise SystemExit(f"{setting.method} {describe_setting(setting.method, options)}: {error}. {hint}") from None
        finally:
            if getattr(reducing_model(model), "tokenprune_config", None) is not None:
                tokenprune.unpatch(model)


def unreachable_row(setting: Setting, error: BudgetUnreachable) -> dict[str, Any]:
    """The row a results file keeps for a budget the method cannot reach, said on stderr too:
    the sweep goes on, and the gap shows in the file (:mod:`evals.pareto` plots no point for it)."""
    print(f"skipped: {error}", file=sys.stderr)
    return {"method": setting.method, "budget": None if setting.budget is None else setting.budget.label, "unreachable": str(error)}


def identity(setting: Setting, options: dict[str, Any]) -> dict[str, Any]:
    """The fields that name a result row: method, setting (:func:`describe_setting`), budget."""
    return {
        "method": setting.method,
        "setting": describe_setting(setting.method, options),
        "budget": None if setting.budget is None else setting.budget.label,
    }
