"""Token dropping vs merging on real labelled data: Fashion-MNIST, the project's own small ViT.

On the full 10,000-image test split, top-1 against GFLOPs for the unreduced model, learned
dropping (DynamicViT predictors), attention-based dropping (EViT-style, with and without fusing
the dropped tokens), random dropping, and ToMe at the same GFLOPs as DynamicViT. Each reduced
row is also compared with that ToMe row image by image: the difference in top-1 with its 95 %
t interval over the test images (:mod:`evals.stats`). The backbone and predictors were
trained by ``evals/train_dynamicvit.py`` (the commands and logs are in ``evals/checkpoints/``).

    python -m evals.fmnist_pruning --data /tmp/fmnist [--keep-ratio 0.7 0.5]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

import tokenprune
from evals.fashion_mnist import FashionMNIST
from evals.harness import RESULTS_DIR, environment, figure_png, json_text, pyplot, write_atomic
from evals.stats import format_difference, paired_difference, verdict
from evals.train_dynamicvit import create_model, load_weights
from tokenprune.schedule import format_schedule

HERE = Path(__file__).resolve().parent
CHECKPOINTS = HERE / "checkpoints"  # package data: installed from a wheel too


@torch.no_grad()
def correct(model: torch.nn.Module, loader: DataLoader, seed: int = 0) -> torch.Tensor:
    """Per test image, in loader order: 1.0 if the top-1 prediction is right, else 0.0."""
    torch.manual_seed(seed)  # random dropping draws from the global generator
    model.eval()
    return torch.cat([(model(images).argmax(-1) == labels).double() for images, labels in loader])


def nearest_tome_r(model: torch.nn.Module, img_size: int, target_gflops: float) -> int:
    """The constant ToMe r whose GFLOPs come closest to ``target_gflops``."""
    best = None
    for r in range(0, 30):
        tokenprune.patch(model, "tome", r=r)
        gap = abs(tokenprune.flops(model, img_size).gflops - target_gflops)
        if best is None or gap < best[0]:
            best = (gap, r)
    return best[1]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m evals.fmnist_pruning", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="Fashion-MNIST idx folder (see evals/fashion_mnist.py)")
    parser.add_argument("--backbone", type=Path, default=CHECKPOINTS / "fmnist_vit.safetensors")
    parser.add_argument(
        "--dynamicvit",
        type=Path,
        default=CHECKPOINTS / "fmnist_vit_dynamicvit.safetensors",
        help="DynamicViT weights: predictors only (backbone frozen) or a whole fine-tuned model",
    )
    parser.add_argument("--keep-ratio", type=float, nargs="+", default=[0.7])
    parser.add_argument("--random-draws", type=int, default=4, help="seeds averaged for random dropping (default 4)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.random_draws < 1:
        parser.error(f"--random-draws must be at least 1, got {args.random_draws}")
    # Up front: patching refuses these too, but only after the unreduced row's pass over the test split.
    bad = [rho for rho in args.keep_ratio if not 0.0 < rho <= 1.0]
    if bad:
        parser.error(f"--keep-ratio must be in (0, 1] (the share of tokens each stage keeps), got {bad[0]}")

    loader = DataLoader(FashionMNIST(args.data, "test"), batch_size=500)

    def backbone() -> torch.nn.Module:
        model = create_model("fmnist_vit")
        load_weights(model, args.backbone)
        return model

    img_size = backbone().patch_embed.img_size[0]

    per_image: dict[str, torch.Tensor] = {}  # method → 100 × correct, for the paired comparisons

    def measure(label: str, family: str, model: torch.nn.Module, hits: torch.Tensor | None = None) -> dict[str, Any]:
        per_image[label] = 100.0 * (correct(model, loader) if hits is None else hits)
        result = {
            "method": label,
            "family": family,
            "gflops": tokenprune.flops(model, img_size).gflops,
            "output_tokens": tokenprune.plan(model, img_size).output_tokens,
            "top1": per_image[label].mean().item(),
        }
        print(f"{label:44s} {result['gflops']:.4f} GFLOPs  {result['output_tokens']:3d} tokens  top-1 {result['top1']:.2f}")
        return result

    def row(label: str, family: str, method: str, **options: Any) -> dict[str, Any]:
        return measure(label, family, tokenprune.patch(backbone(), method, **options))

    def dynamicvit_row(rho: float) -> dict[str, Any]:
        from safetensors import safe_open

        with safe_open(str(args.dynamicvit), "pt") as handle:
            whole_model = "patch_embed.proj.weight" in handle.keys()
        if whole_model:  # DynamicViT's recipe: backbone fine-tuned together with the predictors
            model = tokenprune.patch(create_model("fmnist_vit"), "dynamicvit", keep_ratio=rho)
            load_weights(model, args.dynamicvit)
            label = f"learned dropping (DynamicViT, fine-tuned) ρ={rho}"
        else:
            model = tokenprune.patch(backbone(), "dynamicvit", keep_ratio=rho, predictor=str(args.dynamicvit))
            label = f"learned dropping (DynamicViT, frozen) ρ={rho}"
        return measure(label, "learned dropping (DynamicViT)", model)

    def random_row(rho: float) -> dict[str, Any]:
        """Random dropping is a draw: its mean over ``--random-draws`` seeds, with the range, so
        that a method 'beats random' only by more than the draw-to-draw spread."""
        model = tokenprune.patch(backbone(), "evit", keep_ratio=rho, fuse=False, score="random")
        hits = torch.stack([correct(model, loader, seed=seed) for seed in range(args.random_draws)])
        draws = (100.0 * hits.mean(dim=1)).tolist()
        label = f"random dropping ρ={rho} (mean of {len(draws)} draws, {min(draws):.2f}–{max(draws):.2f})"
        result = measure(label, "random dropping", model, hits=hits.mean(dim=0))
        result["top1_draws"] = draws
        return result

    rows = [row("unreduced", "unreduced", "tome", r=0)]  # r=0 is bit-identical to the unpatched model
    for rho in args.keep_ratio:
        learned = dynamicvit_row(rho)
        group = [learned]
        for fused, name in ((True, "attention dropping (EViT, fused)"), (False, "attention dropping (no fusion)")):
            group.append(row(f"{name} ρ={rho}", name, "evit", keep_ratio=rho, fuse=fused))
        group.append(random_row(rho))
        r = nearest_tome_r(backbone(), img_size, learned["gflops"])
        tome = row(f"ToMe r={format_schedule(r)} (matched GFLOPs)", "ToMe (matched GFLOPs)", "tome", r=r)
        for entry in group:  # image by image against ToMe: is the gap more than these images' noise?
            entry["vs_tome"] = paired_difference(per_image[entry["method"]], per_image[tome["method"]])
            entry["vs_tome"]["verdict"] = verdict(entry["vs_tome"])
        rows += [*group, tome]
    for entry in rows:
        entry["delta_vs_unreduced"] = entry["top1"] - rows[0]["top1"]

    lines = ["| method | GFLOPs | tokens out | top-1 % | Δ vs unreduced | Δ vs matched ToMe [95 % interval] |",
             "| :--- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    lines += [
        f"| {r['method']} | {r['gflops']:.4f} | {r['output_tokens']} | {r['top1']:.2f} | {r['delta_vs_unreduced']:+.2f} | {format_difference(r['vs_tome'], digits=2) if 'vs_tome' in r else ''} |"
        for r in rows
    ]
    header = ("Fashion-MNIST test split (10,000 images), the project's ViT (6 blocks, width 96, 4×4 patches, "
              "trained here by evals/train_dynamicvit.py), CPU. Δ vs matched ToMe: top-1 points, paired image by "
              "image, 95 % t interval over the images; win/loss when it excludes 0, else tie (random dropping: "
              "each image's hits averaged over the draws, so its interval leaves out the draw-to-draw spread)")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    record = {"setup": header, "environment": environment(torch.device("cpu")), "rows": rows}
    write_atomic(args.out_dir / "fmnist_pruning.json", json_text(record))
    write_atomic(args.out_dir / "fmnist_pruning.md", header + "\n\n" + "\n".join(lines) + "\n")
    plot(rows, args.out_dir / "fmnist_pruning.png")
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Top-1 against MFLOPs, one line per method across the keep ratios; random dropping with
    the range of its draws as error bars."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    families = list(dict.fromkeys(r["family"] for r in rows))
    for family, marker in zip(families, "*osD^vP"):
        points = sorted((r for r in rows if r["family"] == family), key=lambda r: r["gflops"])
        x = [r["gflops"] * 1e3 for r in points]
        y = [r["top1"] for r in points]
        if family == "random dropping":
            # (clamped: top1, the mean over draws, can differ from every draw in the last bit)
            spread = [[max(r["top1"] - min(r["top1_draws"]), 0.0) for r in points],
                      [max(max(r["top1_draws"]) - r["top1"], 0.0) for r in points]]
            ax.errorbar(x, y, yerr=spread, marker=marker, capsize=3, label=family + " (range of draws)")
        else:
            ax.plot(x, y, marker=marker, markersize=9 if marker == "*" else 6, label=family)
    ax.set_xlabel("MFLOPs per image (2 per multiply-add)")
    ax.set_ylabel("top-1 % (Fashion-MNIST test)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    write_atomic(path, figure_png(fig))


if __name__ == "__main__":
    main()
