"""Quality against speed: join benchmark and eval results, plot the Pareto front.

    python -m evals.pareto evals/results/bench_dinov2_cpu.json evals/results/fidelity_dinov2_budgets.json \\
        --out evals/results/pareto_dinov2_cpu.png

Speed comes from ``evals.bench`` JSON: per (model, input size, method, setting), the fused-
attention row with the highest throughput among those matching ``--batch-size`` and
``--compile`` (default: the largest batch size, eager). Quality comes from the eval scripts'
JSON: ``evals.imagenet`` (top-1 %), ``evals.fidelity`` (embedding cosine to the unreduced
model); one kind per plot, since top-1 % and a cosine cannot share an axis or a front.
Points join on the setting's name (:func:`evals.settings.describe_setting`), which every
script writes the same way. With ``--x gflops`` no benchmark is needed: quality is
plotted against the GFLOPs the eval files record.

A point is on the **Pareto front** when no other point of its model and input size (any
method) is at least as fast and at least as good, and strictly better in one: each model has
its own front, since a fidelity cosine is to that model's own unreduced output (another
model's unreduced point, cosine 1 too, would otherwise push a slower model off the front).
Quality points without a matching benchmark row are never dropped silently: they are listed
and counted. Writes the PNG and a markdown table of the joined points beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from evals.harness import figure_png, pyplot, write_atomic

__all__ = ["Point", "join", "main", "pareto_front", "quality_points", "speed_points"]


@dataclass(frozen=True)
class Point:
    """One method setting on one model: its cost, speed and quality (None where unknown)."""

    model: str
    input_size: tuple[int, ...]
    method: str  # "none" for the unreduced model
    setting: str
    gflops: float
    speed: float | None = None  # samples/s
    speedup: float | None = None  # over the unreduced model of the same benchmark group
    quality: float | None = None
    metric: str | None = None  # what quality measures, e.g. "top-1 %"

    @property
    def key(self) -> tuple[str, tuple[int, ...], str, str]:
        return (self.model, self.input_size, self.method, self.setting)


# ---------------------------------------------------------------------------------------------
# Reading results


def speed_points(document: dict[str, Any], batch_size: int | None = None, compiled: bool = False) -> list[Point]:
    """The fastest fused row per setting of an ``evals.bench`` document (largest batch size
    unless ``batch_size`` is given; eager unless ``compiled``)."""
    rows = [row for row in document["rows"] if row["attention"] == "fused" and row["compile"] == compiled]
    if not rows:
        return []
    batch = batch_size if batch_size is not None else max(row["batch_size"] for row in rows)
    best: dict[tuple[Any, ...], Point] = {}
    for row in rows:
        if row["batch_size"] != batch:
            continue
        point = Point(
            row["model"], tuple(row["input_size"]), row["method"], row["setting"], row["gflops"],
            speed=row["samples_per_s"], speedup=row["speedup"],
        )  # fmt: skip
        if point.key not in best or point.speed > best[point.key].speed:  # type: ignore[operator]
            best[point.key] = point
    return list(best.values())


def _imagenet_points(document: dict[str, Any]) -> list[Point]:
    model = document["model"]
    top1 = document["top1"]
    if top1 is None or top1["pct"] is None:
        raise ValueError("the eval has no top-1 (no image was evaluated)")
    if document["gflops_per_image"] is None:
        raise ValueError(f"no GFLOPs for {model['name']}: {document.get('gflops_note')}")
    size = tuple(model["data_config"]["input_size"][1:])
    return [
        Point(model["name"], size, model["method"], model["setting"], document["gflops_per_image"],
              quality=top1["pct"], metric="ImageNet top-1 %")
    ]  # fmt: skip


def _fidelity_points(document: dict[str, Any]) -> list[Point]:
    """Rows of ``evals.fidelity`` or ``evals.video_fidelity``; a budget a method could not reach
    has no measurement and no point."""
    return [
        Point(document["model_name"], tuple(document["input_size"]), row["method"], row["setting"], row["gflops"],
              quality=row["cosine_mean"], metric="embedding cosine to unreduced")
        for row in document["rows"]
        if "unreachable" not in row
    ]  # fmt: skip


def quality_points(document: dict[str, Any]) -> list[Point]:
    """Quality points of an eval script's JSON (``evals.imagenet`` or ``evals.fidelity``)."""
    if "top1" in document and "model" in document:
        return _imagenet_points(document)
    if "rows" in document and "model_name" in document:
        return _fidelity_points(document)
    raise ValueError("not an evals.imagenet or evals.fidelity result (no 'top1' or fidelity 'rows')")


def is_bench(document: dict[str, Any]) -> bool:
    rows = document.get("rows")
    return bool(rows) and isinstance(rows, list) and "samples_per_s" in rows[0]


# ---------------------------------------------------------------------------------------------
# Joining and the front


def join(speed: Sequence[Point], quality: Sequence[Point]) -> tuple[list[Point], list[Point]]:
    """(quality points with their speed filled in, quality points no benchmark row matches)."""
    by_key = {point.key: point for point in speed}
    joined, missing = [], []
    for point in quality:
        match = by_key.get(point.key)
        if match is None:
            missing.append(point)
        else:
            joined.append(replace(point, speed=match.speed, speedup=match.speedup))
    return joined, missing


def pareto_front(points: Sequence[Point], x: str) -> list[Point]:
    """The points no other point of the same model and input size dominates on (``x``,
    quality), ``x`` being "speed" or "gflops" (for GFLOPs, fewer is better). Across models a
    point does not dominate: quality is measured against each model's own unreduced output."""

    def cost(point: Point) -> float:
        return point.gflops if x == "gflops" else -point.speed  # type: ignore[operator]

    def dominates(a: Point, b: Point) -> bool:
        return cost(a) <= cost(b) and a.quality >= b.quality and (cost(a) < cost(b) or a.quality > b.quality)  # type: ignore[operator]

    def rival(a: Point, b: Point) -> bool:
        return a is not b and (a.model, a.input_size) == (b.model, b.input_size)

    return [p for p in points if not any(dominates(q, p) for q in points if rival(q, p))]


# ---------------------------------------------------------------------------------------------
# Output


def plot_png(points: Sequence[Point], front: Sequence[Point], x: str, title: str) -> bytes:
    plt = pyplot()

    def xval(point: Point) -> float:
        return point.gflops if x == "gflops" else point.speed  # type: ignore[return-value]

    figure, axes = plt.subplots(figsize=(7, 5), dpi=120)
    # One curve per model and method, one front per model: a line joins points of one model only.
    models = sorted({(p.model, p.input_size) for p in points})
    several = len(models) > 1

    def named(label: str, model: tuple[str, tuple[int, ...]]) -> str:
        return f"{label} ({model[0]}, {'x'.join(map(str, model[1]))})" if several else label

    curves = sorted({(p.model, p.input_size, p.method) for p in points}, key=lambda k: (k[:2], k[2] != "none", k[2]))
    for model_name, size, method in curves:
        members = sorted((p for p in points if (p.model, p.input_size, p.method) == (model_name, size, method)), key=xval)
        style = {"marker": "*", "markersize": 14, "linestyle": "none"} if method == "none" else {"marker": "o"}
        label = named(method if method != "none" else "unreduced", (model_name, size))
        axes.plot([xval(p) for p in members], [p.quality for p in members], label=label, **style)
        for point in members:
            if point.setting:
                axes.annotate(point.setting, (xval(point), point.quality), fontsize=6, alpha=0.7,
                              xytext=(3, 3), textcoords="offset points")  # fmt: skip
    for model in models:
        ordered = sorted((p for p in front if (p.model, p.input_size) == model), key=xval)
        axes.step([xval(p) for p in ordered], [p.quality for p in ordered], where="post" if x == "gflops" else "pre",
                  color="black", alpha=0.3, linewidth=4, label=named("Pareto front", model))  # fmt: skip
    axes.set_xlabel("GFLOPs per sample (fewer is cheaper)" if x == "gflops" else "throughput (samples/s)")
    metrics = sorted({p.metric for p in points if p.metric})
    axes.set_ylabel(" / ".join(metrics) or "quality")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return figure_png(figure)


def format_markdown(points: Sequence[Point], front: Sequence[Point], missing: Sequence[Point]) -> str:
    lines = [
        "| model | method | setting | GFLOPs | samples/s | speedup | quality | metric | Pareto |",
        "| :--- | :--- | :--- | ---: | ---: | ---: | ---: | :--- | :---: |",
    ]
    on_front = {p.key for p in front}
    for p in sorted(points, key=lambda p: (p.model, p.method != "none", p.method, -p.gflops)):
        speed = "-" if p.speed is None else f"{p.speed:.1f}"
        speedup = "-" if p.speedup is None else f"{p.speedup:.2f}x"
        lines.append(
            f"| {p.model} | {p.method} | {p.setting or '-'} | {p.gflops:.2f} | {speed} | {speedup} | "
            f"{p.quality:.4f} | {p.metric} | {'yes' if p.key in on_front else ''} |"
        )
    if missing:
        lines.append(f"\n{len(missing)} quality point(s) had no benchmark row and are not plotted:")
        lines += [f"- {p.model} {p.method} {p.setting or '(unreduced)'}" for p in missing]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m evals.pareto",
        description="Join evals.bench speed with evals.imagenet / evals.fidelity quality; plot the Pareto front.",
    )
    parser.add_argument("results", nargs="+", type=Path, help="JSON files from evals.bench, evals.imagenet, evals.fidelity")
    parser.add_argument("--x", choices=["speed", "gflops"], default="speed", help="x axis: measured speed (default) or GFLOPs")
    parser.add_argument("--batch-size", type=int, help="benchmark rows of this batch size (default: the largest)")
    parser.add_argument("--compiled", action="store_true", help="use the benchmark's torch.compile rows")
    parser.add_argument("--title", help="plot title (default: the benchmark's device)")
    parser.add_argument("--out", type=Path, required=True, help="PNG path; the markdown table goes beside it (.md)")
    args = parser.parse_args(argv)

    speed: list[Point] = []
    quality: list[Point] = []
    quality_from: dict[tuple[str, tuple[int, ...], str, str], tuple[Path, Point]] = {}
    devices = []
    for path in args.results:
        try:
            document = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise SystemExit(f"{path}: cannot read JSON ({error})") from None
        if is_bench(document):
            found = speed_points(document, args.batch_size, args.compiled)
            if not found:
                raise SystemExit(
                    f"{path}: no fused-attention row{' at batch ' + str(args.batch_size) if args.batch_size else ''}"
                    f"{' compiled' if args.compiled else ' without compile'}: choose --batch-size/--compiled "
                    "among the benchmark's groups"
                )
            clash = {point.key for point in found} & {point.key for point in speed}
            if clash:
                raise SystemExit(f"{path}: repeats settings of an earlier benchmark file ({sorted(clash)[0]}): "
                                 "give one benchmark per model and setting (e.g. one device)")
            speed += found
            # the batch speed_points took its rows from: the largest among the fused rows of this compile mode
            batch = args.batch_size or max(row["batch_size"] for row in document["rows"]
                                           if row["attention"] == "fused" and row["compile"] == args.compiled)
            devices.append(f"{document['environment']['device_name']}, batch {batch}, {document['config']['dtype']}"
                           f"{', compiled' if args.compiled else ''}")  # fmt: skip
        else:
            try:
                found = quality_points(document)
            except (KeyError, ValueError) as error:
                raise SystemExit(f"{path}: {error}") from None
            # One point per key: the table and the front are keyed by it. The same measurement twice
            # (every fidelity file's unreduced row; an --r and a --budget that picked the same r) is
            # kept once; two different ones (say a float32 and a bfloat16 eval) cannot share a point.
            for point in found:
                if point.key not in quality_from:
                    quality_from[point.key] = (path, point)
                    quality.append(point)
                    continue
                first_path, first = quality_from[point.key]
                if (first.quality, first.gflops) != (point.quality, point.gflops):
                    raise SystemExit(
                        f"{first_path} and {path} measure {point.model} {point.method} {point.setting or '(unreduced)'} "
                        f"differently ({first.quality} and {point.quality}): give one quality result per model and "
                        "setting (e.g. one dtype)"
                    )
    if not quality:
        raise SystemExit("no quality results: give at least one evals.imagenet or evals.fidelity JSON")
    metrics = sorted({point.metric for point in quality})
    if len(metrics) > 1:  # one axis, one front: top-1 % and a cosine cannot share them
        raise SystemExit(f"the quality results measure different things ({', '.join(metrics)}): plot each kind separately")
    if args.x == "speed":
        if not speed:
            raise SystemExit("--x speed needs an evals.bench JSON (or use --x gflops)")
        points, missing = join(speed, quality)
        for point in missing:
            print(f"warning: no benchmark row for {point.model} {point.method} {point.setting!r}", file=sys.stderr)
        if not points:
            raise SystemExit(
                "no quality point matches a benchmark row: run both with the same model, input size and settings, "
                "or plot against --x gflops (evals.video_fidelity's inflated DINOv2 has no evals.bench model)"
            )
    else:
        points, missing = list(quality), []
    front = pareto_front(points, args.x)
    title = args.title or ", ".join(sorted(set(devices))) or "GFLOPs"
    table = format_markdown(points, front, missing)
    write_atomic(args.out.with_suffix(".md"), table)  # first: the table needs no matplotlib
    write_atomic(args.out, plot_png(points, front, args.x, title))
    print(table)
    return {"points": points, "front": front, "missing": missing}


def cli() -> None:
    """The console script: ``main`` returns its results to Python callers, which
    ``sys.exit`` would print and turn into exit status 1."""
    main()


if __name__ == "__main__":
    cli()
