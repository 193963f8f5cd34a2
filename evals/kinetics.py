"""Kinetics-400 evaluation of a (token-reduced) video ViT.

    python -m evals.kinetics --data /data/k400/val --checkpoint videomae-base-finetuned-kinetics \\
        --model video_vit_base_patch16_224 --method tome --r 64
    python -m evals.kinetics --labels-file val.csv --data /data/k400 --single-view ...

**Data.** ``--data DIR`` with one sub-folder per class, or ``--labels-file CSV`` with
``path,label`` rows (optional header; relative paths resolve against ``--data``, else the CSV's
folder). ``--classes FILE`` (one name per line, line order = index; e.g. OpenCV's
``action_recongnition_kinetics.txt`` for Kinetics-400) names the classes: folder names and CSV
labels are looked up in it, and a name it lacks is an error. Without it, folders are indexed
in natural order, as timm's ImageNet reader does (``2`` before ``10``; a warning says so when
their count is not the model's class count), and CSV labels must be ints. Files in the class
folders that are not videos by their extension are counted and listed in the JSON. Labels
outside the model's classes are an error. Videos are decoded with PyAV (RGB; only the sampled
frames are kept). A video whose packets the decoder rejects, or that decodes to under 95 % of
the frames its container announces, is listed under ``damaged`` and evaluated on the frames
that decoded.

**Protocol.** VideoMAE's Kinetics test protocol by default, index for index and pixel for
pixel as its test loader (:func:`clip_indices`, :func:`make_views`): 16 frames with a stride of
4 (a 64-frame span), the short side resized to 224 (bilinear, no antialiasing), ``--clips 5``
temporal clips evenly spaced over the video × ``--crops 3`` spatial 224² crops along the long
side (left/top, centre, right/bottom); the softmax probabilities of the 15 views are averaged,
as VideoMAE's test script does (``--average logits`` averages logits instead).
``--single-view``: one centre clip, one centre crop. A video of fewer than (frames − 1) ×
stride + 1 frames (61) repeats its last sampled frame (as VideoMAE) and is listed as
``too_short`` (and still evaluated).
Undecodable videos are listed as ``failed``, counted, and scored as wrong in ``top1_all`` and
``top5_all``.

**Reduction.** ``--method`` with ``--r`` or ``--option key=value``, or ``--budget 0.5``: the
method's weakest setting within that fraction of the unreduced GFLOPs per view (the search
of ``evals.bench`` and ``evals.imagenet``, so each picks the same setting for a budget).
``--dtype bfloat16`` runs every forward, the timed ones too, under autocast.

**Several GPUs** (``torchrun --nproc_per_node N -m evals.kinetics ...``): each rank evaluates
its shard of the videos (each video on exactly one rank), counts are summed and lists
gathered, rank 0 writes (:mod:`evals.distributed`). ``--merge-r`` there, not ``--r``: torchrun's
own parser stops on ``--r`` as an abbreviation of its ``--rdzv-*``/``--role`` (pytorch/pytorch#120601).

**Output.** top-1 / top-5 over the decoded videos (:func:`evals.metrics.topk_correct`'s rule
for ties), JSON in ``evals/results/`` (atomic write) with the environment, GFLOPs per view
from ``tokenprune.flops``, and model-only throughput on random clips, measured apart from
decoding (``evals.harness.measure_throughput``), and the command that reproduces it.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from timm.utils.misc import natural_key
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import tokenprune
from evals.distributed import Dist, ShardSampler, setup
from evals.harness import (
    DTYPES,
    RESULTS_DIR,
    autocast,
    command_line,
    environment,
    files_under,
    jsonable,
    measure_throughput,
    write_atomic,
)
from evals.metrics import topk_correct
from evals.settings import BudgetUnreachable, Setting, describe_setting, method_options, parse_gflops_budget, parse_option, resolve
from tokenprune.schedule import parse_schedule

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".3gp", ".wmv", ".ogv", ".ts")
MEAN = (0.485, 0.456, 0.406)  # VideoMAE normalises with the ImageNet statistics
STD = (0.229, 0.224, 0.225)

Samples = list[tuple[str, int]]
# A video decoding to fewer than this share of the frames its container announces is listed as
# damaged (a truncated file, or data the demuxer skipped without an error).
SHORTFALL = 0.95


# ------------------------------------------------------------------------------------- data


def _is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def _first(names: Sequence[str], count: int = 10) -> str:
    """The first ``count`` names, and an ellipsis when there are more."""
    return ", ".join(names[:count]) + (" …" if len(names) > count else "")


class FolderSamples(NamedTuple):
    samples: Samples
    classes: list[str]  # label → folder name
    not_videos: list[str]  # files in the class folders left out by their extension


def samples_from_folder(root: Path, classes: Sequence[str] = ()) -> FolderSamples:
    """One sub-folder per class, videos found recursively. The label of a folder is its name's
    index in ``classes``; without ``classes``, in the folder names in natural order (``2``
    before ``10``, as timm orders ImageNet's class folders). Videos lying in ``root`` itself,
    or no video at all, stop the run: neither has a label to give. Files whose extension is no
    video's are returned, for the eval to report."""
    if not root.is_dir():
        raise SystemExit(f"--data {root} is not a folder: give the folder holding one sub-folder per class")
    loose = sorted(path.name for path in root.iterdir() if path.is_file() and _is_video(path))
    if loose:  # the raw layout of some Kinetics downloads: their labels are in a CSV
        raise SystemExit(
            f"{root} holds {len(loose)} video(s) directly, not in one folder per class ({_first(loose)}): "
            "give --labels-file with path,label rows, or sort the videos into class folders"
        )
    # Hidden folders (.ipynb_checkpoints, .git) are no class: counted, one would shift every label.
    folders = sorted((d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=natural_key)
    if classes:
        index = {name: i for i, name in enumerate(classes)}
        unknown = [name for name in folders if name not in index]
        if unknown:
            raise SystemExit(f"class folders not in --classes: {unknown[:10]}{' …' if len(unknown) > 10 else ''}")
    else:
        classes, index = folders, {name: i for i, name in enumerate(folders)}
    files = [(path, index[name]) for name in folders for path in sorted(files_under(root / name))]
    samples = [(str(path), label) for path, label in files if _is_video(path)]
    not_videos = [str(path) for path, _ in files if not _is_video(path)]
    if not samples:
        raise SystemExit(
            f"no videos under {root} ({len(folders)} class folders): expected one sub-folder per class holding "
            f"{'/'.join(VIDEO_EXTENSIONS)} files; check that --data points at them"
        )
    return FolderSamples(samples, list(classes), not_videos)


def samples_from_csv(csv_path: Path, root: Path | None = None, classes: Sequence[str] = ()) -> Samples:
    """``path,label`` rows; a first row (blank rows aside) that names no video file (e.g.
    ``path,label``) and whose label is neither an int nor a known class is a header. Any other
    bad label, and any row that is not two cells (a third column, a label without a path),
    stops the run: a typo must not drop a video or a column silently. Blank rows are skipped; a
    CSV listing no video is an error.

    A malformed row gets ``evals.imagenet.samples_from_csv``'s message; the two functions are
    separate because labels here may be class names, and the header rule differs accordingly."""
    index = {name: i for i, name in enumerate(classes)}
    base = root if root is not None else csv_path.parent
    samples: Samples = []
    listed: dict[str, int] = {}  # path → the line that listed it first
    first = True  # the first row that is not blank: the one that may be a header
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:  # -sig: a spreadsheet's byte-order mark
        for row_number, row in enumerate(csv.reader(handle)):
            if not row or all(not cell.strip() for cell in row):
                continue
            first, may_be_header = False, first
            if len(row) != 2 or not row[0].strip():
                raise SystemExit(f"{csv_path}:{row_number + 1}: expected 'path,label', got {row!r}")
            path, label = row[0].strip(), row[1].strip()
            if label in index:
                value = index[label]
            else:
                try:
                    value = int(label)
                except ValueError:
                    if may_be_header and not _is_video(Path(path)):
                        continue  # header
                    raise SystemExit(f"{csv_path}:{row_number + 1}: label {label!r} is not an int or a known class")
            full = Path(path) if Path(path).is_absolute() else base / path
            again = listed.setdefault(os.path.normpath(full), row_number + 1)
            if again != row_number + 1:  # it would be evaluated, and counted, twice
                raise SystemExit(f"{csv_path}:{row_number + 1}: {path} is listed again (first on line {again}): list each video once")
            samples.append((str(full), value))
    if not samples:
        raise SystemExit(f"{csv_path} lists no videos: add path,label rows (a header alone is not enough)")
    return samples


class DecodedClips(NamedTuple):
    clips: list[np.ndarray]  # each [num_frames, H, W, 3] uint8 RGB, in clip_indices order
    num_video_frames: int  # frames decoded from the video's first stream
    damaged_packets: int  # packets the decoder rejected (their frames are missing)
    announced_frames: int  # the container's count, or duration × frame rate (0: unknown)


def _video_stream(container: Any) -> Any:
    """The container's first video stream; a file without one (audio only) is refused by name."""
    if not container.streams.video:
        raise ValueError("no video stream in the file" + (" (audio only)" if container.streams.audio else ""))
    return container.streams.video[0]


def _frame_count_estimate(path: str) -> int:
    """The smaller of the container's frame count and duration × frame rate, where known (WebM
    and Matroska headers have no count; an MP4 trimmed without re-encoding counts the frames
    its edit list cuts, which the duration leaves out); 0 when neither is known. A wrong
    estimate only costs a second decoding pass, or lists a healthy video as damaged: a
    variable-frame-rate stream without a count can announce more frames than it has."""
    import av

    with av.open(path) as container:
        stream = _video_stream(container)
        duration = (stream.duration * stream.time_base) if stream.duration else (container.duration or 0) / 1e6
        rate = stream.average_rate or stream.guessed_rate or 0
        estimates = [n for n in (stream.frames, int(round(float(duration) * float(rate)))) if n > 0]
        return min(estimates, default=0)


def decode_clips(path: str, num_frames: int, stride: int, num_clips: int,
                 expected_frames: int | None = None) -> DecodedClips:
    """The frames that ``clip_indices`` samples from the first video stream, decoded with PyAV.

    Only sampled frames are kept, at most clips × frames (80 for the default protocol): a 10 s
    1080p video at 30 fps holds 0.5 GB in a loader worker rather than 1.9 GB for every frame.
    Which frames are sampled depends on the video's length, so decoding plans with
    ``expected_frames`` (default: the header's count, or duration × frame rate; 0: count by
    decoding once first) and decodes a second time only when the stream turns out longer or
    shorter than planned and a sampled frame was not kept. Packets the decoder rejects (a
    damaged file) are skipped and counted, so the rest of the video is still evaluated; damage
    the demuxer skips silently shows as fewer frames than announced. Display rotation is
    ignored, as by VideoMAE's decoder. Raises when no frame decodes."""
    import av

    def decode(wanted: set[int]) -> tuple[dict[int, np.ndarray], int, int]:
        kept, count, damaged = {}, 0, 0
        with av.open(path) as container:
            stream = _video_stream(container)
            # Slice threading: frame threading reports a late packet's error at the flush, where
            # the frames still in its threads are lost, or with many threads not at all.
            stream.thread_type = "SLICE"
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except av.error.InvalidDataError:
                    damaged += 1
                    continue
                for frame in frames:
                    if count in wanted:
                        kept[count] = frame.to_ndarray(format="rgb24")
                    count += 1
        return kept, count, damaged

    announced = _frame_count_estimate(path)
    if expected_frames is None:
        expected_frames = announced
    if expected_frames <= 0:
        expected_frames = decode(set())[1]
    planned = {i for clip in clip_indices(expected_frames, num_frames, stride, num_clips) for i in clip}
    kept, count, damaged = decode(planned)
    if count == 0:
        raise ValueError("no frames decoded" + (f" ({damaged} damaged packets)" if damaged else ""))
    indices = clip_indices(count, num_frames, stride, num_clips)
    if count != expected_frames and not all(i in kept for clip in indices for i in clip):
        kept, count, damaged = decode({i for clip in indices for i in clip})
    return DecodedClips([np.stack([kept[i] for i in clip]) for clip in indices], count, damaged, announced)


def frames_needed(num_frames: int, stride: int) -> int:
    """Frames a clip covers without repeating one: first to last sampled frame."""
    return (num_frames - 1) * stride + 1


def clip_indices(num_video_frames: int, num_frames: int, stride: int, num_clips: int) -> list[list[int]]:
    """Frame indices of ``num_clips`` clips of ``num_frames`` frames, as VideoMAE's Kinetics test
    loader samples them: every ``stride``-th frame of the video (the last of those repeated
    when there are fewer than ``num_frames``), and clip k starting at int(k · step) in that
    list, step = (length − num_frames) / (num_clips − 1); one clip is centred. (250 frames,
    16 × 4, 5 clips: starting at frames 0, 44, 92, 140, 188.)"""
    sampled = list(range(0, num_video_frames, stride))
    sampled += sampled[-1:] * max(num_frames - len(sampled), 0)
    room = len(sampled) - num_frames
    # int(k · step) with the step divided out first, as VideoMAE: int(k · room / (clips − 1)) differs
    # where k · step rounds to just below an integer (room 115, 8 clips: 7 · (115 / 7) = 114.99…).
    step = room / (num_clips - 1) if num_clips > 1 else 0.0
    starts = [room // 2] if num_clips == 1 else [int(k * step) for k in range(num_clips)]
    return [sampled[start : start + num_frames] for start in starts]


def crop_offsets(length: int, crop: int, num_crops: int) -> list[int]:
    """Offsets of ``num_crops`` crops along one axis, as VideoMAE's test loader: int(k · step),
    step = (length − crop) / (num_crops − 1); one crop is centred."""
    room = max(length - crop, 0)
    if num_crops == 1:
        return [room // 2]
    step = room / (num_crops - 1)  # divided out first, as VideoMAE (see clip_indices)
    return [int(k * step) for k in range(num_crops)]


def make_views(clips: Sequence[np.ndarray], num_crops: int, size: int) -> Tensor:
    """[clips·crops, 3, T, size, size] uint8 views of decoded clips ([T, H, W, 3] uint8 each), as
    VideoMAE's test loader makes them: the short side resized to ``size`` (bilinear without
    antialiasing, like its OpenCV resize; the long side truncated to an int), then ``num_crops``
    crops along the long side. uint8 keeps what loader workers pass on small: normalise on the
    device with :func:`normalize`."""
    views = []
    for frames in clips:
        clip = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # [T, 3, H, W]
        height, width = clip.shape[-2:]
        if height <= width:
            new_h, new_w = size, max(size, int(size * width / height))
        else:
            new_h, new_w = max(size, int(size * height / width)), size
        clip = F.interpolate(clip, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=False)
        clip = clip.round_().clamp_(0, 255).to(torch.uint8)
        along_height = new_h > new_w
        for offset in crop_offsets(max(new_h, new_w), size, num_crops):
            view = clip[:, :, offset : offset + size, :] if along_height else clip[:, :, :, offset : offset + size]
            views.append(view.permute(1, 0, 2, 3))  # [3, T, size, size]
    return torch.stack(views)


def normalize(views: Tensor) -> Tensor:
    """uint8 views → float, normalised with ImageNet's mean and std (VideoMAE's)."""
    mean = torch.tensor(MEAN, device=views.device).view(3, 1, 1, 1)
    std = torch.tensor(STD, device=views.device).view(3, 1, 1, 1)
    return (views.float() / 255.0 - mean) / std


class Item(NamedTuple):
    views: Tensor | None  # [V, 3, T, S, S], None when the video could not be decoded
    label: int
    index: int
    num_frames: int  # decoded frames (0 when failed)
    damaged_packets: int  # packets the decoder rejected (their frames are missing)
    announced_frames: int  # what the container announced (0: unknown)
    error: str | None


class VideoDataset(Dataset):
    def __init__(self, samples: Samples, num_frames: int, stride: int, clips: int, crops: int, size: int) -> None:
        self.samples, self.num_frames, self.stride = samples, num_frames, stride
        self.clips, self.crops, self.size = clips, crops, size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Item:
        path, label = self.samples[index]
        try:
            decoded = decode_clips(path, self.num_frames, self.stride, self.clips)
            views = make_views(decoded.clips, self.crops, self.size)
        except Exception as error:  # noqa: BLE001 - every unreadable video is reported, none stops the run
            return Item(None, label, index, 0, 0, 0, f"{type(error).__name__}: {error}")
        return Item(views, label, index, decoded.num_video_frames, decoded.damaged_packets,
                    decoded.announced_frames, None)


def collate(items: Sequence[Item]) -> list[Item]:
    return list(items)


# ------------------------------------------------------------------------------------- model


def model_factory(name: str) -> Any:
    """The ``tokenprune.models`` factory called ``name``; only video ViTs take clips."""
    from tokenprune import models

    factory = getattr(models, name, None)
    if factory is None or not name.startswith("video_vit_"):
        raise SystemExit(f"unknown --model {name!r}; choose one of the video_vit_* factories in tokenprune.models")
    return factory


def check_clip_size(args: argparse.Namespace) -> None:
    """Stop unless ``--num-frames`` and ``--img-size`` are multiples of the model's tubelet and
    patch size. The model checks too, but only once built, after the devices are set up, with
    a message that names neither the option nor a value that works. The sizes are read from a
    default-sized copy on the meta device: no memory, no weights, a fraction of a second."""
    with torch.device("meta"):
        embed = model_factory(args.model)().patch_embed
    for option, value, step, what in (("--num-frames", args.num_frames, embed.tubelet_size, "tubelet"),
                                      ("--img-size", args.img_size, embed.patch_size[0], "patch")):
        if value % step:
            raise SystemExit(f"{option} {value} is not a multiple of {args.model}'s {what} size {step}: "
                             f"give e.g. {option} {max(step, round(value / step) * step)}")


def build_model(args: argparse.Namespace, options: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model, patched, and the options it was patched with: ``options``, or with
    ``--budget`` the method's weakest setting within that fraction of the GFLOPs per view."""
    from tokenprune import models

    factory = model_factory(args.model)
    model = factory(num_frames=args.num_frames, img_size=args.img_size, num_classes=args.num_classes)
    if args.checkpoint:
        try:
            loaded = models.load_videomae(model, args.checkpoint)
        except ValueError as error:  # keys or shapes: the model built from the options is not the checkpoint's
            raise SystemExit(
                f"--checkpoint {args.checkpoint} does not fit the model built from --model {args.model}, "
                f"--num-classes {args.num_classes}: give the ones it was trained with.\n{error}"
            ) from None
        if loaded.format == "transformers":
            models.use_transformers_norm_eps(model, args.checkpoint)  # (the factory's are the original VideoMAE's)
    if args.budget is not None:
        try:
            options = resolve(Setting(args.method, options, args.budget), model, (args.num_frames, args.img_size, args.img_size))
        except BudgetUnreachable as error:
            raise SystemExit(str(error)) from None
    if args.method != "none":
        try:
            tokenprune.patch(model, args.method, **options)
            # The clip's plan, before any video is decoded: a setting the clip size cannot take
            # (temporal merging of a single tubelet frame) failed only at the first forward.
            tokenprune.plan(model, (args.num_frames, args.img_size, args.img_size))
        except (TypeError, ValueError) as error:
            raise SystemExit(f"{args.method}: {error}") from None
    return model.eval(), options


class Tally(NamedTuple):
    """One rank's results: counts, and the videos that failed, were too short or damaged."""

    correct: dict[int, float]
    evaluated: int
    failed: list[dict[str, Any]]
    too_short: list[dict[str, Any]]
    damaged: list[dict[str, Any]]


def evaluate(model: torch.nn.Module, loader: DataLoader, device: torch.device, views_per_batch: int, needed: int,
             average: str = "probabilities", ks: Sequence[int] = (1, 5), progress: bool = True,
             dtype: torch.dtype | None = None) -> Tally:
    """Top-k counts over the decodable videos of ``loader`` (the views' softmax probabilities,
    or logits, averaged per video, in float32); failed, too-short and damaged videos listed.
    ``dtype`` other than float32 runs the model under autocast."""
    correct = dict.fromkeys(ks, 0.0)
    evaluated = 0
    failed: list[dict[str, Any]] = []
    too_short: list[dict[str, Any]] = []
    damaged: list[dict[str, Any]] = []
    dataset = loader.dataset
    bar = tqdm(total=len(loader), desc="videos", unit="video", disable=not progress, file=sys.stderr)
    with torch.inference_mode():
        for items in loader:
            for item in items:
                path = dataset.samples[item.index][0]
                if item.views is None:
                    failed.append({"path": path, "error": item.error})
                    continue
                if item.num_frames < needed:
                    too_short.append({"path": path, "frames": item.num_frames})
                if item.damaged_packets or item.num_frames < SHORTFALL * item.announced_frames:
                    damaged.append({"path": path, "damaged_packets": item.damaged_packets, "frames": item.num_frames,
                                    "announced_frames": item.announced_frames})
                chunks = item.views.split(views_per_batch)
                with autocast(device, dtype):
                    logits = torch.cat([model(normalize(chunk.to(device, non_blocking=True))) for chunk in chunks]).float()
                scores = logits.softmax(dim=-1) if average == "probabilities" else logits
                hits = topk_correct(scores.mean(dim=0, keepdim=True), torch.tensor([item.label], device=device), ks)
                for k, count in hits.items():
                    correct[k] += count
                evaluated += 1
            bar.update(len(items))
            bar.set_postfix(top1=f"{100 * correct[ks[0]] / max(evaluated, 1):.1f}")
    bar.close()
    return Tally(correct, evaluated, failed, too_short, damaged)


def build_parser() -> argparse.ArgumentParser:
    from tokenprune import METHODS

    parser = argparse.ArgumentParser(
        prog="python -m evals.kinetics", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, help="folder per class, or the root for --labels-file")
    parser.add_argument("--labels-file", type=Path, help="CSV of path,label rows")
    parser.add_argument("--classes", type=Path, help="class names, one per line, line order = index")
    parser.add_argument("--limit", type=int, help="only the first N videos")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader decoding workers (default 4)")
    parser.add_argument("--model", default="video_vit_base_patch16_224")
    parser.add_argument("--checkpoint", help="VideoMAE checkpoint: the original repo's .pth, or a Hugging Face file or save_pretrained folder (run with its config's LayerNorm eps)")
    parser.add_argument("--num-classes", type=int, default=400)
    parser.add_argument("--num-frames", type=int, default=16)
    parser.add_argument("--stride", type=int, default=4, help="frame sampling stride (default 4)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--clips", type=int, default=5, help="temporal clips per video (default 5)")
    parser.add_argument("--crops", type=int, default=3, help="spatial crops per clip (default 3)")
    parser.add_argument("--single-view", action="store_true", help="one centre clip × one centre crop")
    parser.add_argument("--average", choices=["probabilities", "logits"], default="probabilities",
                        help="what is averaged over a video's views (default: softmax probabilities, as VideoMAE)")
    video_methods = sorted(name for name, config in METHODS.items() if getattr(config, "supports_video", False))
    parser.add_argument("--method", default="none", choices=["none", *video_methods])
    # --merge-r: torchrun reads a bare --r as an ambiguous abbreviation of its own --rdzv-*/--role/
    # --run-path options and stops before this script runs (pytorch/pytorch#120601).
    parser.add_argument("--r", "--merge-r", type=parse_schedule, help="the method's r (under torchrun write --merge-r)")
    parser.add_argument("--budget", type=parse_gflops_budget,
                        help="set the method's r to the weakest with at most this fraction of the GFLOPs per view (0.5 or 50%%)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="autocast dtype of the forward passes, also the timed ones (default float32)")
    parser.add_argument("--option", type=parse_option, action="append", default=[],
                        help="method option key=value (a Python literal: prop_attn=False, r=(16,-1)), repeatable")
    parser.add_argument("--device", help="torch device (default: cuda if available — cuda:LOCAL_RANK under torchrun — else cpu)")
    parser.add_argument("--views-per-batch", type=int, default=15, help="views per forward (default 15)")
    parser.add_argument("--throughput-batch", type=int, default=8, help="clips per timed forward (0: skip)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed throughput passes (default 2)")
    parser.add_argument("--runs", type=int, default=10, help="timed throughput passes")
    parser.add_argument("--seed", type=int, default=0, help="seed before creating the model (random weights are the same on every rank)")
    # --out and --quiet as in the other scripts; --output and --no-progress, their first names, still work
    parser.add_argument("--out", "--output", type=Path, help="JSON path (default evals/results/kinetics_<model>_<method>.json)")
    parser.add_argument("--quiet", "--no-progress", action="store_true", help="no progress bar")
    return parser


def read_classes(path: Path | None) -> list[str]:
    if path is None:
        return []
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def check_paths(args: argparse.Namespace) -> None:
    """Stop on a missing input file or folder, naming the option: before the model is built,
    and with one line rather than the FileNotFoundError of the first read."""
    if args.classes is not None and not args.classes.is_file():
        raise SystemExit(f"--classes {args.classes} does not exist: give a file of class names, one per line "
                         "(line order = index), or leave --classes out")
    if args.labels_file is not None and not args.labels_file.is_file():
        raise SystemExit(f"--labels-file {args.labels_file} does not exist: give a CSV of path,label rows")
    if args.checkpoint is not None and not Path(args.checkpoint).exists():
        raise SystemExit(f"--checkpoint {args.checkpoint} does not exist: give a VideoMAE checkpoint file or "
                         "save_pretrained folder, or leave --checkpoint out for random weights")
    if args.data is not None and not args.data.is_dir():
        raise SystemExit(f"--data {args.data} is not a folder: give the folder holding one sub-folder per class "
                         "(or, with --labels-file, the folder its relative paths start from)")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.single_view:
        args.clips = args.crops = 1
    negative = [f"--{name.replace('_', '-')} {getattr(args, name)}"
                for name in ("workers", "warmup", "throughput_batch") if getattr(args, name) < 0]
    if negative:
        raise SystemExit(f"{', '.join(negative)}: must be at least 0")
    # (--runs too, before the evaluation: the timing comes after it, and would lose its results)
    small = [f"--{name.replace('_', '-')} {getattr(args, name)}"
             for name in ("num_frames", "stride", "clips", "crops", "img_size", "views_per_batch", "limit", "runs")
             if getattr(args, name) is not None and getattr(args, name) < 1]
    if small:
        raise SystemExit(f"{', '.join(small)}: must be at least 1")
    check_paths(args)
    check_clip_size(args)
    options = method_options(args.method, args.option, r=args.r)
    if args.budget is not None and args.method == "none":
        raise SystemExit("--budget sets a method's strength: give a --method too")
    classes = read_classes(args.classes)
    warnings: list[str] = []
    not_videos: list[str] = []
    if args.labels_file:
        samples = samples_from_csv(args.labels_file, args.data, classes)
        if not any(os.path.exists(path) for path, _ in samples):  # not every video "failed"
            raise SystemExit(f"none of the {len(samples)} videos {args.labels_file} lists exists (e.g. {samples[0][0]}): "
                             "relative paths start from --data, else the CSV's folder; give --data the folder they start from")
    elif args.data:
        samples, folder_classes, not_videos = samples_from_folder(args.data, classes)
        if not classes and len(folder_classes) != args.num_classes:
            warnings.append(
                f"{args.data} has {len(folder_classes)} class folders but the model has {args.num_classes} classes: "
                "labels are indices of the folder names in natural order and match the model's classes only if every class "
                "is present (give --classes otherwise)"
            )
        if not_videos:
            warnings.append(
                f"{len(not_videos)} file(s) in the class folders are not evaluated: their extension is none of "
                f"{', '.join(VIDEO_EXTENSIONS)} ({_first(not_videos, 5)}; all in the JSON's not_videos): "
                "convert or rename them to evaluate them"
            )
    else:
        raise SystemExit("give --data (a folder per class) or --labels-file")
    if args.limit is not None:
        samples = samples[: args.limit]
    bad_labels = sorted({label for _, label in samples if not 0 <= label < args.num_classes})
    if bad_labels:
        raise SystemExit(f"labels {bad_labels[:10]} are outside the model's {args.num_classes} classes: correct them "
                         f"(or --classes), or give --num-classes {max(bad_labels) + 1}")
    ks = tuple(k for k in (1, 5) if k <= args.num_classes)

    command = command_line("evals.kinetics", argv)
    device, ddp = setup(args.device)
    try:
        return _run(args, command, options, samples, not_videos, ks, warnings, device, ddp)
    finally:
        ddp.close()


def _run(args: argparse.Namespace, command: str, options: dict[str, Any], samples: Samples, not_videos: list[str],
         ks: tuple[int, ...], warnings: list[str], device: torch.device, ddp: Dist) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model, options = build_model(args, options)
    model = model.to(device)
    dtype = DTYPES[args.dtype]
    dataset = VideoDataset(samples, args.num_frames, args.stride, args.clips, args.crops, args.img_size)
    loader = DataLoader(dataset, batch_size=1, sampler=ShardSampler(len(dataset), ddp.rank, ddp.world_size),
                        num_workers=args.workers, collate_fn=collate)
    tally = evaluate(model, loader, device, args.views_per_batch, frames_needed(args.num_frames, args.stride),
                     args.average, ks, progress=ddp.lead and not args.quiet, dtype=dtype)
    totals = ddp.all_sum([tally.evaluated, *tally.correct.values()], device)
    evaluated, correct = totals[0], dict(zip(ks, totals[1:]))
    failed = sorted((f for part in ddp.gather(tally.failed) for f in part), key=lambda f: f["path"])
    too_short = sorted((f for part in ddp.gather(tally.too_short) for f in part), key=lambda f: f["path"])
    damaged = sorted((f for part in ddp.gather(tally.damaged) for f in part), key=lambda f: f["path"])
    if evaluated + len(failed) != len(samples):
        raise RuntimeError(f"count mismatch: {evaluated} evaluated + {len(failed)} failed != {len(samples)} videos")
    if failed:
        warnings.append(f"{len(failed)} of {len(samples)} videos could not be decoded (listed under failed); "
                        f"top1/top5 are over the {evaluated} decoded, top1_all/top5_all count the failed as wrong")
    if damaged:
        warnings.append(f"{len(damaged)} videos had damaged packets or fewer frames than announced (listed under "
                        "damaged); they were evaluated on the frames that decoded")

    def pct(k: int, total: int) -> float | None:
        return 100 * correct[k] / total if k in correct and total else None

    result: dict[str, Any] = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "args": jsonable(vars(args)),  # which data (--data, --labels-file, --classes), --limit, --seed...
        "model": args.model,
        "checkpoint": args.checkpoint,
        "method": args.method,
        "options": jsonable(options),
        "setting": describe_setting(args.method, options),
        "budget": None if args.budget is None else args.budget.label,
        "dtype": args.dtype,
        "protocol": {"frames": args.num_frames, "stride": args.stride, "size": args.img_size, "clips": args.clips,
                     "crops": args.crops, "views_averaged": args.average,
                     "resize": "short side bilinear without antialiasing, rounded to uint8 (VideoMAE's test loader)"},
        "gflops_per_view": tokenprune.flops(model, (args.num_frames, args.img_size, args.img_size)).gflops,
        "world_size": ddp.world_size,
        "videos": len(samples),
        "evaluated": evaluated,
        "top1": pct(1, evaluated),
        "top5": pct(5, evaluated),
        "top1_all": pct(1, len(samples)),
        "top5_all": pct(5, len(samples)),
        "num_failed": len(failed),
        "failed": failed,
        "num_too_short": len(too_short),
        "too_short": too_short,
        "num_damaged": len(damaged),
        "damaged": damaged,
        "not_videos": not_videos,  # files in the class folders left out by their extension
        "warnings": warnings,
    }
    if args.throughput_batch > 0:
        clips = torch.randn(args.throughput_batch, 3, args.num_frames, args.img_size, args.img_size, device=device)
        timing = measure_throughput(model, clips, warmup=args.warmup, runs=args.runs, dtype=dtype)
        result["throughput"] = {"clips_per_s": timing["images_per_s"], "median_s": timing["median_s"],
                                "batch": args.throughput_batch, "warmup": args.warmup, "runs": args.runs,
                                "what": "model only (rank 0): random clips on the device, median of timed passes",
                                "clips_per_s_per_rank": ddp.gather(timing["images_per_s"])}
    result["environment"] = environment(device)
    output = args.out or RESULTS_DIR / f"kinetics_{args.model}_{args.method}.json"
    if ddp.lead:
        for message in warnings:
            print(f"WARNING: {message}", file=sys.stderr)
        write_atomic(output, json.dumps(result, indent=2, default=str) + "\n")
        top1 = result["top1"]
        print(f"top-1 {top1 if top1 is None else f'{top1:.2f}'} on {evaluated}/{len(samples)} videos "
              f"({len(failed)} failed, {len(too_short)} too short) → {output}")
    return result


if __name__ == "__main__":
    main()
