"""ImageNet-1k validation of any timm classifier, optionally reduced by a tokenprune method.

    python -m evals.imagenet --data /data/imagenet --model vit_base_patch16_224 --pretrained \\
        --method tome --r 16 --dtype bfloat16 --batch-size 256
    torchrun --nproc_per_node 8 -m evals.imagenet --data /data/imagenet --model ... --method none

**Data.** ``--data DIR`` is an image folder as timm reads it (``timm.data.create_dataset``):
``DIR/<class>/*.JPEG``, or ``DIR/val/<class>/...`` (the split folder is found as timm does,
``--split``), or a ``.tar`` archive of such class folders (read in place, as timm's tar reader
does). Classes are the leaf folder names sorted with timm's natural sort (the same as
a plain sort for ImageNet's wnids ``n01440764``..., and numeric order for folders named
``0``..``999`` as in ImageNet-V2); ``--class-map FILE`` fixes the mapping explicitly (timm's
class-map format, e.g. ``timm/data/_info/imagenet_synsets.txt``). timm numbers only the folders
holding one of its images, so without a class map a class folder that holds none (empty, or
only ``.webp`` files) before the last class stops the run, naming it, and so do images at different
depths (a class folder holding its images in a sub-folder, which timm would label by the
sub-folder's name). Flat folders of labelled
images: ``--labels-file CSV`` (rows ``path,label``, optional header, each image once; relative
paths resolve against ``--data``, else the CSV's folder) or ``--label-from-filename REGEX`` (searched in each
file name under ``--data``; the label is the group named ``label``, else group 1).

**Preprocessing** is the model's own: ``timm.data.resolve_data_config`` + ``create_transform``
(resize, center crop, normalisation from its pretrained config; its test size and crop where it
names them, as timm's ``validate.py``, unless ``--use-train-size``), with ``--img-size``,
``--crop-pct``, ``--crop-mode``, ``--interpolation``, ``--mean`` and ``--std`` overrides for
weights trained with other settings (``--checkpoint``). Images are read as timm reads them
(Pillow, converted to RGB), except 16-bit grayscale PNGs, which Pillow's conversion clips white:
those become their high bytes, as Pillow reads 16-bit colour PNGs.

**Unreadable images** (missing, truncated, not an image) are never skipped silently: each is
counted and listed with its error in the JSON and a warning is printed. Accuracy percentages
are over the images that were evaluated; ``counts`` lets you recompute them over all images.

**Metrics** (``evals.metrics``): top-1/top-5 counts and % with ties broken at random in
expectation (a label tied with one other class counts ½; unbiased under bfloat16 logits, where
ties are common, and independent of ``torch.topk``'s ordering), and ImageNet-ReaL with
``--real-labels FILE`` (``real.json``; ``--real-labels timm`` for the copy shipped in timm).

**Timing.** ``eval_wall_time_s`` is end to end (data loading, decoding, transfer, model).
``throughput`` is model-only: after the eval, one batch of the evaluation images already on
the device is timed with :func:`evals.harness.measure_throughput` (warm-up passes, device
synchronised around each pass, median). ``gflops_per_image`` comes from
:func:`tokenprune.flops` (2 FLOPs per multiply-add) for ViTs that tokenprune supports, else
null.

**Multi-process** (``torchrun``, ``WORLD_SIZE > 1``): NCCL on CUDA (one GPU per local rank),
Gloo on CPU. Rank ``r`` evaluates images ``r, r + W, r + 2W, ...``: no padding and no
dropping, so counts are exact for any dataset size; counts are all-reduced and the unreadable
files all-gathered. Only rank 0 writes the JSON (atomically) and prints. Give ``r`` as
``--merge-r`` (or ``--option r=...``) there: torchrun's own parser stops on ``--r`` as an ambiguous
abbreviation of its ``--rdzv-*``/``--role`` options (pytorch/pytorch#120601).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import pickle
import re
import sys
import tarfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import timm
import timm.data
import torch
from PIL import Image
from timm.data.readers.img_extensions import get_img_extensions
from timm.utils.misc import natural_key
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import tokenprune
from evals.distributed import ShardSampler, setup
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
from evals.metrics import real_correct, topk_correct
from evals.settings import (
    BudgetUnreachable,
    Setting,
    describe_setting,
    method_options,
    parse_gflops_budget,
    parse_option,
    resolve,
)
from tokenprune.methods.dynamicvit import holds_predictors
from tokenprune.schedule import parse_schedule

__all__ = [
    "EvalDataset",
    "FolderSamples",
    "build_parser",
    "collate",
    "load_checkpoint",
    "main",
    "read_checkpoint",
    "samples_from_csv",
    "samples_from_filenames",
    "samples_from_folder",
]

TOPK = (1, 5)
# Model-only timing defaults per device kind: (warm-up passes, timed passes).
BENCH_DEFAULTS = {"cpu": (2, 5), "cuda": (10, 30)}
_MAX_NAMED_KEYS = 20

Samples = list[tuple[str, int]]  # (image path, or "ARCHIVE.tar::member", label)
TAR_MEMBER = "::"  # joins a .tar archive's path and a member's name in a sample


# ---------------------------------------------------------------------------------------------
# Samples: which files, which labels


class FolderSamples(NamedTuple):
    samples: Samples
    class_to_idx: dict[str, int]
    root: Path  # the folder or archive read
    # Files in the class folders that timm's readers leave out because their extension is not one
    # of timm's image extensions (.webp, .bmp, .tif among them, which Pillow would read).
    not_images: list[str]


def samples_from_folder(root: Path, split: str, class_map: str = "") -> FolderSamples:
    """Images and labels of a class-per-folder tree, or of a ``.tar`` archive holding one,
    found and ordered by timm's own readers (``timm.data.create_dataset``).

    What timm leaves out is not dropped silently here: files of other extensions are listed
    (``not_images``), and images in folders that ``class_map`` does not name stop the run, which
    names the folders (a partial map is easily a typo)."""
    archive = root.is_file() and root.suffix == ".tar"
    if not root.is_dir() and not archive:
        raise SystemExit(f"--data {root} is neither a folder nor a .tar archive")
    try:
        dataset = timm.data.create_dataset("", root=str(root), split=split, class_map=class_map)
    except (RuntimeError, AssertionError) as error:  # timm's "Found 0 images in ...", "Cannot locate ... class map"
        raise SystemExit(f"--data {root}: {error}") from None
    reader = dataset.reader
    extensions = get_img_extensions(as_set=True)
    if archive:
        if any(child is not None for _, _, child in reader.samples):
            raise SystemExit(f"{root} holds .tar archives inside: give one archive of class folders, or unpack it")
        samples = [(f"{root}{TAR_MEMBER}{info.name}", int(t)) for (info, _, _), t in zip(reader.samples, reader.targets)]
        with tarfile.open(root) as tar:
            files, top = [Path(m.name) for m in tar.getmembers() if m.isfile()], Path(".")
    else:
        samples = [(str(path), int(target)) for path, target in reader.samples]
        files, top = files_under(Path(reader.root)), Path(reader.root)
    images = [path for path in files if path.suffix.lower() in extensions]
    # What lies beside the class folders (a README, a labels CSV) is no class's file.
    not_images = sorted(str(path) for path in files if path.suffix.lower() not in extensions and path.parent != top)
    class_to_idx = dict(reader.class_name_to_idx if archive else reader.class_to_idx)
    if not class_map and class_to_idx:
        # timm labels an image by the name of the folder it lies in, at any depth: a class folder
        # holding its images in a sub-folder (c2/extra/*.JPEG beside c1/*.JPEG) is class "extra",
        # and the classes sorted after it shift by one, without a word. One depth for every
        # image folder is a layout whose leaf folders are the classes (images in the root itself
        # are the caller's to refuse, with their own message).
        depths: dict[int, list[Path]] = {}
        for folder in sorted({path.parent if archive else path.parent.relative_to(top) for path in images}):
            if folder.parts:
                depths.setdefault(len(folder.parts), []).append(folder)
        if len(depths) > 1:
            examples = [f"{folders[0].as_posix()}/ (depth {depth})" for depth, folders in sorted(depths.items())]
            raise SystemExit(
                f"images under {root} lie in folders at different depths ({', '.join(examples)}): timm labels an "
                "image by the name of the folder it lies in, so a class folder holding its images in a sub-folder "
                "would be labelled by the sub-folder's name and the classes after it would get wrong labels. Put "
                "each class's images directly in its class folder, or give --class-map naming the folders that hold images"
            )
        # timm numbers only the folders holding one of its images: a class folder left empty (or
        # holding only .webp files) would give every folder after it the next class's label.
        parents = {path.parent for path in files if path.parent != top}
        if not archive:
            parents |= {Path(folder) for folder, subfolders, names in os.walk(top, followlinks=True)
                        if not subfolders and not names and Path(folder) != top}
        # beside the class folders only: one holding them (an archive's top folder), or a sub-folder of a class, is no class
        beside = {path.parent.parent for path in images}
        folders = {folder.name for folder in parents if folder.parent in beside}
        last = max(class_to_idx, key=natural_key)
        empty = sorted((name for name in folders - set(class_to_idx)
                        if not name.startswith(".") and natural_key(name) < natural_key(last)), key=natural_key)
        if empty:
            shifted = sum(natural_key(name) > natural_key(empty[0]) for name in class_to_idx)
            raise SystemExit(
                f"class folder(s) {', '.join(empty[:10])}{' …' if len(empty) > 10 else ''} under {root} hold no image "
                f"timm reads ({', '.join(sorted(extensions))}): timm numbers only the folders with images, so the "
                f"{shifted} folder(s) after them would get wrong labels. Add their images (convert other formats), "
                "remove the folders, or give --class-map"
            )
    if class_map:
        unmapped: dict[str, int] = {}
        for path in images:
            if path.parent.name not in class_to_idx:
                unmapped[path.parent.name] = unmapped.get(path.parent.name, 0) + 1
        if unmapped:
            names = sorted(unmapped)
            raise SystemExit(
                f"{sum(unmapped.values())} images are in folders that --class-map does not name "
                f"({', '.join(names[:10])}{' …' if len(names) > 10 else ''}): add them to the map or move them out of {reader.root}"
            )
    return FolderSamples(samples, class_to_idx, root if archive else Path(reader.root), not_images)


def samples_from_csv(csv_path: Path, root: Path | None = None) -> Samples:
    """Rows ``path,label``; a first row (blank rows aside) whose label is not an integer and
    whose path has no file extension is a header, and skipped. Relative paths resolve against ``root``, else the
    CSV's folder. Files that do not exist are kept: the eval counts them as unreadable."""
    base = root if root is not None else csv_path.parent
    samples: Samples = []
    listed: dict[str, int] = {}  # path → the line that listed it first
    first = True  # the first row that is not blank: the one that may be a header
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:  # -sig: a spreadsheet's byte-order mark
        for line_number, row in enumerate(csv.reader(handle), 1):
            if not row or all(not cell.strip() for cell in row):
                continue
            first, may_be_header = False, first
            if len(row) != 2:
                raise SystemExit(f"{csv_path}:{line_number}: expected 'path,label', got {row!r}")
            path, label = row[0].strip(), row[1].strip()
            try:
                value = int(label)
            except ValueError:
                if may_be_header and not Path(path).suffix:
                    continue  # a header ("path,label"): a file with a bad label stops below
                raise SystemExit(f"{csv_path}:{line_number}: label {label!r} is not an integer") from None
            full = Path(path) if Path(path).is_absolute() else base / path
            again = listed.setdefault(os.path.normpath(full), line_number)
            if again != line_number:  # it would be evaluated, and counted, twice
                raise SystemExit(f"{csv_path}:{line_number}: {path} is listed again (first on line {again}): list each image once")
            samples.append((str(full), value))
    if not samples:
        raise SystemExit(f"{csv_path} lists no images")
    return samples


def samples_from_filenames(root: Path, pattern: str) -> Samples:
    """Every image file under ``root`` (recursively, timm's image extensions, natural order),
    labelled by ``pattern`` searched in its file name: group ``label`` if named, else group 1.
    An image whose name does not match is an error, not a silent skip."""
    if not root.is_dir():
        raise SystemExit(f"--data {root} is not a folder")
    regex = re.compile(pattern)
    if regex.groups < 1:
        raise SystemExit(f"--label-from-filename {pattern!r} needs a group capturing the label")
    group: int | str = "label" if "label" in regex.groupindex else 1
    extensions = get_img_extensions(as_set=True)
    files = sorted(
        (p for p in files_under(root) if p.suffix.lower() in extensions),
        key=lambda p: natural_key(str(p.relative_to(root))),
    )
    samples: Samples = []
    unmatched: list[str] = []
    for path in files:
        match = regex.search(path.name)
        if match is None or match.group(group) is None:
            unmatched.append(path.name)
            continue
        try:
            samples.append((str(path), int(match.group(group))))
        except ValueError:
            raise SystemExit(f"{path.name}: label {match.group(group)!r} is not an integer") from None
    if unmatched:
        raise SystemExit(
            f"{len(unmatched)} image(s) under {root} do not match --label-from-filename {pattern!r}: {unmatched[:10]}"
        )
    if not samples:
        raise SystemExit(f"no images under {root}")
    return samples


# ---------------------------------------------------------------------------------------------
# Loading: a dataset that reports unreadable images instead of skipping or replacing them


class Item(NamedTuple):
    image: Tensor | None  # None: the file could not be read
    label: int
    index: int
    error: str | None


class Batch(NamedTuple):
    images: Tensor | None  # the readable images of the batch, or None if there are none
    labels: Tensor
    indices: list[int]  # dataset indices of ``images``' rows
    failures: list[tuple[int, str]]  # (dataset index, error) of the unreadable ones


def _open_rgb(source: str | IO[bytes]) -> Image.Image:
    with Image.open(source) as image:
        if image.mode.startswith("I;16"):
            # A 16-bit grayscale PNG: Pillow's convert clips its values at 255, turning all but
            # the darkest pixels white, while it reads 16-bit colour PNGs as 8-bit RGB (the high
            # bytes). Take the high bytes here too.
            high = np.asarray(image).astype(np.uint16) >> 8
            return Image.fromarray(high.astype(np.uint8)).convert("RGB")  # 2-D uint8: mode L
        return image.convert("RGB")  # decodes every pixel, so truncated files fail here


class EvalDataset(Dataset):
    """``samples[i]`` → :class:`Item`. Unlike timm's ``ImageDataset`` (which logs and returns
    the next image instead), an unreadable file yields ``image=None`` and its error, so that
    the eval can count it exactly."""

    def __init__(self, samples: Samples, transform: Any) -> None:
        self.samples = samples
        self.transform = transform
        # Open archives, per process: a loader worker must not share a parent's file offset.
        self._archives: dict[str, tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]] = {}
        self._archives_pid = os.getpid()

    def _source(self, path: str) -> str | IO[bytes]:
        archive, separator, member = path.partition(TAR_MEMBER)
        if not separator:
            return path
        if self._archives_pid != os.getpid():
            self._archives, self._archives_pid = {}, os.getpid()
        if archive not in self._archives:
            tar = tarfile.open(archive)
            # tarfile finds a name by scanning every member (~4 ms an image in ImageNet's 50,000-member
            # val.tar, as long as decoding it); the last member of a name wins, as there.
            self._archives[archive] = (tar, {info.name: info for info in tar.getmembers()})
        tar, members = self._archives[archive]
        if member not in members:
            raise FileNotFoundError(f"{member} is not in {archive}")
        handle = tar.extractfile(members[member])
        if handle is None:
            raise FileNotFoundError(f"{member} is not a file in {archive}")
        return handle

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Item:
        path, label = self.samples[index]
        try:
            image = _open_rgb(self._source(path))
        except Exception as error:  # noqa: BLE001 - any decode failure is reported, not raised
            return Item(None, label, index, f"{type(error).__name__}: {error}")
        # The transform runs outside the try: a bug there should fail loudly, not look like a bad file.
        return Item(self.transform(image), label, index, None)


def collate(items: Sequence[Item]) -> Batch:
    """Stack the readable images; pass the unreadable ones on as failures."""
    good = [item for item in items if item.image is not None]
    failures = [(item.index, item.error or "unreadable") for item in items if item.image is None]
    images = torch.stack([item.image for item in good]) if good else None
    labels = torch.tensor([item.label for item in good], dtype=torch.long)
    return Batch(images, labels, [item.index for item in good], failures)


# ---------------------------------------------------------------------------------------------
# Model


def _name_keys(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_MAX_NAMED_KEYS])
    more = f", ... ({len(keys) - _MAX_NAMED_KEYS} more)" if len(keys) > _MAX_NAMED_KEYS else ""
    return f"{len(keys)} [{shown}{more}]"


def read_checkpoint(path: Path) -> dict[str, Tensor]:
    """Weights read offline: ``.safetensors``, or a ``torch.save`` file read with
    ``weights_only=True`` holding a state dict or ``{'state_dict' | 'model': state dict}``
    (a timm training checkpoint, arguments included).
    A ``module.`` prefix on every key (a DDP-wrapped save) is removed."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path), device="cpu")
        except SafetensorError as error:  # its words name no file
            raise SystemExit(f"{path} is no readable safetensors file ({error})") from None
    else:
        # timm's training checkpoints keep the run's argparse arguments beside the weights
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as error:
                found = re.search(r"GLOBAL (\S+)", str(error))
                raise SystemExit(
                    f"{path} holds Python objects besides tensors ({found[1] if found else 'unknown'}), which "
                    "weights_only=True does not load: if you trust the file, save its state dict alone, e.g. "
                    "torch.save(torch.load(path, weights_only=False)['state_dict'], 'weights.pth')"
                ) from None
            except (RuntimeError, EOFError) as error:  # a damaged file: torch's words name no file
                raise SystemExit(f"{path} cannot be read: it is damaged, or no torch.save file ({type(error).__name__})") from None
    if isinstance(state, Mapping) and not all(isinstance(v, Tensor) for v in state.values()):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
        else:
            raise SystemExit(
                f"{path}: not a state dict, and has no 'state_dict' or 'model' entry (keys: {list(state)[:10]})"
            )
    if not isinstance(state, Mapping):
        raise SystemExit(f"{path}: expected a state dict, got {type(state).__name__}")
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def load_checkpoint(model: nn.Module, state: Mapping[str, Tensor], path: Path, num_classes_option: bool = True) -> None:
    """Load ``state`` (read from ``path``) strictly: missing, unexpected and mis-shaped keys are
    named in the error, and a classifier of another size as such (with the ``--num-classes``
    that fits it, where the caller has that option)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise SystemExit(
            f"{path} does not fit {type(model).__name__}: missing keys {_name_keys(missing)}, "
            f"unexpected keys {_name_keys(unexpected)}"
        )
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape
    ]
    if mismatched:
        raise SystemExit(f"{path}: shape mismatch (checkpoint vs model): {_name_keys(mismatched)}{_classifier_hint(model, state, num_classes_option)}")
    model.load_state_dict(state, strict=True)


def _classifier_hint(model: nn.Module, state: Mapping[str, Tensor], num_classes_option: bool) -> str:
    """The usual reason a checkpoint does not fit, with its fix: a classifier of another size."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Linear):
        return ""
    key = next(f"{name}.weight" for name, module in model.named_modules() if module is head)
    saved = state.get(key)
    if saved is None or saved.ndim != 2 or saved.shape[0] == head.out_features:
        return ""
    hint = f"; the checkpoint classifies {saved.shape[0]} classes, the model {head.out_features}"
    return hint + (f": pass --num-classes {saved.shape[0]}" if num_classes_option else "")


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected one or three numbers, got {text!r}") from None
    if len(values) not in (1, 3):
        raise argparse.ArgumentTypeError(f"expected one or three numbers, got {text!r}")
    return values


# The names timm's eval transform resizes with (``timm.data.transforms.str_to_interp_mode``).
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


def _interpolation(text: str) -> str:
    """One of :data:`INTERPOLATIONS`, named on a typo (timm's own error is a bare KeyError from
    inside ``create_transform``)."""
    if text not in INTERPOLATIONS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of timm's interpolations: {', '.join(INTERPOLATIONS)}")
    return text


def _gflops(model: nn.Module, input_size: tuple[int, ...]) -> tuple[float | None, list[int] | None, str | None]:
    """(GFLOPs per image, tokens entering each block, why not) from tokenprune's counter."""
    from tokenprune.patch.vit import check_supported

    try:
        check_supported(model)
        report = tokenprune.flops(model, input_size[-2:])
        tokens = list(tokenprune.plan(model, input_size[-2:]).tokens)
    except (TypeError, ValueError) as error:
        return None, None, str(error)
    return report.total / 1e9, tokens, None


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    methods = ["none", *sorted(tokenprune.METHODS)]
    parser = argparse.ArgumentParser(
        prog="python -m evals.imagenet",
        description="ImageNet-1k validation (top-1/top-5, optional ReaL) of a timm model, "
        "optionally reduced by tokenprune.",
    )
    add = parser.add_argument
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data",
        type=Path,
        help="image folder: DIR/<class>/* (or DIR/<split>/<class>/*), "
        "or the root for --labels-file / --label-from-filename",
    )
    group.add_argument(
        "--split",
        default="validation",
        help="split sub-folder looked for in --data, as timm does (default: validation, which also finds 'val')",
    )
    group.add_argument(
        "--class-map",
        default="",
        help="timm class map file (class name per line, or 'name index') fixing folder → label",
    )
    labels = group.add_mutually_exclusive_group()
    labels.add_argument(
        "--labels-file",
        type=Path,
        help="CSV of path,label rows for a flat folder (relative to --data, else to the CSV)",
    )
    labels.add_argument(
        "--label-from-filename",
        metavar="REGEX",
        help="label = group 'label' (else group 1) of REGEX searched in each file name under --data",
    )
    group.add_argument(
        "--real-labels", help="ImageNet-ReaL real.json (or 'timm' for the copy shipped in timm); off by default"
    )
    group.add_argument("--limit", type=int, help="evaluate only the first N images (in dataset order)")
    group.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="DataLoader worker processes (default: min(8, cpus))",
    )
    group.add_argument("--batch-size", type=int, default=64, help="images per forward (default 64)")

    group = parser.add_argument_group("model")
    group.add_argument("--model", required=True, help="timm model name")
    weights = group.add_mutually_exclusive_group()
    weights.add_argument(
        "--pretrained", action="store_true", help="timm's pretrained weights (downloads unless cached)"
    )
    weights.add_argument(
        "--checkpoint",
        type=Path,
        help="weights file, loaded strictly and offline: .safetensors or a torch.save state dict",
    )
    group.add_argument(
        "--num-classes", type=int, help="classifier size passed to timm.create_model (default: the model's)"
    )
    group.add_argument(
        "--model-arg",
        action="append",
        default=[],
        type=parse_option,
        metavar="KEY=VALUE",
        help="extra timm.create_model keyword, repeatable (e.g. img_size=384, dynamic_img_size=True)",
    )
    group.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed before creating the model (random weights are the same on every rank/run)",
    )

    group = parser.add_argument_group("token reduction")
    group.add_argument("--method", default="none", choices=methods, help="tokenprune method, or none (default)")
    # --merge-r: torchrun reads a bare --r as an ambiguous abbreviation of its own --rdzv-*/--role/
    # --run-path options and stops before this script runs (pytorch/pytorch#120601).
    group.add_argument(
        "--r", "--merge-r", type=parse_schedule,
        help="the method's r: 16, r,inflection (16,-1) or a per-block list (8,8,4); under torchrun write --merge-r",
    )
    group.add_argument("--keep-ratio", type=float, help="the pruning methods' ρ (dynamicvit, evit)")
    group.add_argument(
        "--budget",
        type=parse_gflops_budget,
        help="set the method's r or keep ratio to the weakest with at most this fraction of the GFLOPs "
        "(0.5 or 50%%; as evals.bench --budget, so the two join in evals.pareto)",
    )
    group.add_argument("--predictor", help="trained DynamicViT predictor weights (safetensors), for --method dynamicvit")
    group.add_argument(
        "--option",
        action="append",
        default=[],
        type=parse_option,
        metavar="KEY=VALUE",
        help="any other method option, repeatable; VALUE is a Python literal "
        "(local_block=3, pos_weight=0.5, backend=torch)",
    )

    group = parser.add_argument_group("preprocessing overrides (default: the model's pretrained config)")
    group.add_argument("--img-size", type=int, help="input resolution")
    group.add_argument("--use-train-size", action="store_true",
                       help="the pretrained config's train input size and crop, not its test ones (timm's default)")
    group.add_argument("--crop-pct", type=float, help="center crop fraction (e.g. 0.875)")
    group.add_argument("--crop-mode", choices=["center", "squash", "border"], help="timm crop mode")
    group.add_argument("--interpolation", type=_interpolation, help="resize interpolation (bilinear, bicubic, ...)")
    group.add_argument("--mean", type=_floats, help="normalisation mean: one value or three (e.g. 0.5)")
    group.add_argument("--std", type=_floats, help="normalisation std: one value or three")

    group = parser.add_argument_group("run")
    add("--device", help="torch device (default: cuda if available — cuda:LOCAL_RANK under torchrun — else cpu)")
    add("--threads", type=int, help="torch CPU threads (default: PyTorch's)")
    add("--dtype", choices=sorted(DTYPES), default="float32", help="float32 (default) or autocast to bfloat16/float16")
    # --warmup and --runs as in the other scripts; --bench-warmup and --bench-runs, their first names, still work
    add("--warmup", "--bench-warmup", dest="warmup", type=int,
        help="untimed passes before the model-only timing (default 2 on CPU, 10 on CUDA)")
    add("--runs", "--bench-runs", dest="runs", type=int,
        help="timed passes of the model-only timing; the median is reported (default 5 on CPU, 30 on CUDA)")
    add("--no-bench", action="store_true", help="skip the model-only throughput measurement")
    add("--out", type=Path, help="JSON path (default: evals/results/imagenet_<model>_<method>.json)")
    add("--quiet", action="store_true", help="no progress bar")
    return parser


def _load_real_labels(spec: str) -> dict[str, list[int]]:
    if spec == "timm":
        path = Path(timm.data.__file__).parent / "_info" / "imagenet_real_labels.json"
    else:
        path = Path(spec)
    with open(path) as handle:
        lists = json.load(handle)
    return {f"ILSVRC2012_val_{i + 1:08d}.JPEG": labels for i, labels in enumerate(lists)}


def _first_names(names: Sequence[str], count: int = 10) -> str:
    return ", ".join(names[:count]) + (" …" if len(names) > count else "")


def _count(value: float) -> str:
    """An expected count: whole when it is (ties make halves, thirds...)."""
    return str(int(value)) if float(value).is_integer() else f"{value:.2f}"


def _pct(correct: float, total: int) -> float | None:
    return 100.0 * correct / total if total else None


def _format_pct(pct: float | None) -> str:
    return "n/a: no image evaluated" if pct is None else f"{pct:.2f} %"


def check_files(args: argparse.Namespace) -> None:
    """Up front, before a model is built or an image read: the files the command names exist
    (the class map is timm's to find: it looks in the data folder too)."""
    named = [("--labels-file", args.labels_file), ("--checkpoint", args.checkpoint)]
    if args.real_labels not in (None, "timm"):
        named.append(("--real-labels", Path(args.real_labels)))
    for flag, path in named:
        if path is not None and not path.is_file():
            raise SystemExit(f"{flag} {path} does not exist: give the path of an existing file")
    flat = args.labels_file is not None or args.label_from_filename is not None
    archive = not flat and args.data is not None and args.data.is_file() and args.data.suffix == ".tar"
    if args.data is not None and not (args.data.is_dir() or archive):
        what = "a folder" if flat else "a folder or a .tar archive of class folders"
        raise SystemExit(f"--data {args.data} is not {what}: give the path that holds the images")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the evaluation; returns the JSON document (on every rank; rank 0 writes it)."""
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    # All before the model runs: the timing comes after the evaluation, whose results a bad
    # --runs would throw away unwritten.
    least = {"batch_size": 1, "limit": 1, "runs": 1, "threads": 1, "workers": 0, "warmup": 0, "img_size": 1}
    bad = [f"--{name.replace('_', '-')} {getattr(args, name)} (at least {low})"
           for name, low in least.items() if getattr(args, name) is not None and getattr(args, name) < low]
    # timm's resolve_data_config takes a --crop-pct of 0 for "not given" (the pretrained crop
    # instead, silently); a std of 0 stopped the run at the first image, inside torchvision's
    # Normalize, and a negative one flips the inputs' sign.
    if args.crop_pct is not None and not args.crop_pct > 0:
        bad.append(f"--crop-pct {args.crop_pct} (more than 0)")
    if args.std is not None and not all(value > 0 for value in args.std):
        bad.append(f"--std {','.join(f'{value:g}' for value in args.std)} (each more than 0)")
    if bad:
        raise SystemExit(f"out of range: {', '.join(bad)}")
    check_files(args)
    options = method_options(args.method, args.option, r=args.r, keep_ratio=args.keep_ratio, predictor=args.predictor)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    device, ddp = setup(args.device)
    lead = ddp.lead
    warnings: list[str] = []

    def warn(message: str) -> None:
        warnings.append(message)
        if lead:
            print(f"WARNING: {message}", file=sys.stderr, flush=True)

    try:
        # Model first: its pretrained config decides the preprocessing.
        torch.manual_seed(args.seed)
        model_kwargs = dict(args.model_arg)
        if args.num_classes is not None:
            model_kwargs["num_classes"] = args.num_classes
        try:
            model = timm.create_model(args.model, pretrained=args.pretrained, **model_kwargs)
        except RuntimeError as error:
            if not str(error).startswith("Unknown model"):
                raise
            raise SystemExit(f"{error}: timm.list_models('*part_of_the_name*') lists timm's models") from None
        checkpoint = read_checkpoint(args.checkpoint) if args.checkpoint is not None else None
        with_predictors = checkpoint is not None and holds_predictors(checkpoint)
        if with_predictors and args.method != "dynamicvit":
            raise SystemExit(f"{args.checkpoint} holds DynamicViT predictors (blocks.N.reducer.*): "
                             "evaluate it with --method dynamicvit")
        if with_predictors and args.predictor:
            raise SystemExit(f"{args.checkpoint} already holds predictors: leave out --predictor")
        if checkpoint is not None and not with_predictors:
            load_checkpoint(model, checkpoint, args.checkpoint)
        elif checkpoint is None and not args.pretrained:
            warn("no --pretrained or --checkpoint: the weights are random")
        model.eval()
        num_classes = int(getattr(model, "num_classes", 0) or 0)
        if num_classes < 1:
            raise SystemExit(f"{args.model} has no classifier (num_classes={num_classes})")
        ks = tuple(k for k in TOPK if k <= num_classes)

        overrides = {
            "img_size": args.img_size,
            "crop_pct": args.crop_pct,
            "crop_mode": args.crop_mode,
            "interpolation": args.interpolation,
            "mean": args.mean,
            "std": args.std,
        }
        overrides = {k: v for k, v in overrides.items() if v is not None}
        patch_embed = getattr(model, "patch_embed", None)
        built_size = getattr(patch_embed, "img_size", None)
        # timm keeps dynamic_img_size on the model and tells the embedding strict_img_size=False.
        dynamic_size = getattr(model, "dynamic_img_size", False) or not getattr(patch_embed, "strict_img_size", True)
        fixed_size = isinstance(built_size, tuple) and len(built_size) == 2 and not dynamic_size
        if fixed_size and args.img_size is not None and (args.img_size, args.img_size) != tuple(built_size):
            raise SystemExit(
                f"{args.model} is built for {built_size[0]}x{built_size[1]} images, not --img-size {args.img_size}: build it "
                f"at that size with --model-arg img_size={args.img_size} (timm resizes the position embedding), "
                "or --model-arg dynamic_img_size=True"
            )
        if args.img_size is None and fixed_size:
            # A ViT built at another size (--model-arg img_size=384) takes only that size, which its
            # pretrained config (the data config's default) may not name.
            channels = timm.data.resolve_data_config({}, model=model)["input_size"][0]
            overrides["input_size"] = (channels, *built_size)
        # timm's validate.py default: the pretrained config's test size and crop where it has them.
        data_config = timm.data.resolve_data_config(overrides, model=model, use_test_size=not args.use_train_size)
        transform = timm.data.create_transform(**data_config, is_training=False)
        input_size = tuple(data_config["input_size"])

        gflops_unreduced, _, _ = _gflops(model, input_size)
        if args.budget is not None:
            if args.method == "none":
                raise SystemExit("--budget needs a --method")
            try:
                options = resolve(Setting(args.method, options, args.budget), model, input_size[1:])
            except BudgetUnreachable as error:
                raise SystemExit(str(error)) from None
        if args.method != "none":
            try:
                tokenprune.patch(model, args.method, **options)
            except (TypeError, ValueError) as error:  # an option the method does not have, or a bad value
                raise SystemExit(f"--method {args.method}: {error}") from None
        if with_predictors:  # into the patched model, whose predictors it names
            load_checkpoint(model, checkpoint, args.checkpoint)
        gflops, tokens, gflops_note = _gflops(model, input_size)
        model.to(device)

        # Data.
        class_to_idx: dict[str, int] | None = None
        num_class_folders: int | None = None
        not_images: list[str] = []
        if args.labels_file is not None:
            samples, source, root = (
                samples_from_csv(args.labels_file, args.data),
                "labels_file",
                args.data or args.labels_file.parent,
            )
            if not any(os.path.exists(path) for path, _ in samples):  # not every image "unreadable"
                raise SystemExit(
                    f"none of the {len(samples)} images {args.labels_file} lists exists (e.g. {samples[0][0]}): "
                    f"relative paths start from --data, else the CSV's folder; give --data the folder they start from"
                )
        elif args.label_from_filename is not None:
            if args.data is None:
                raise SystemExit("--label-from-filename needs --data")
            samples, source, root = (
                samples_from_filenames(args.data, args.label_from_filename),
                "label_from_filename",
                args.data,
            )
        else:
            if args.data is None:
                raise SystemExit("give --data (and --labels-file or --label-from-filename for flat folders)")
            samples, class_to_idx, root, not_images = samples_from_folder(args.data, args.split, args.class_map)
            # The folders holding images: with --class-map, class_to_idx is every class the map names.
            num_class_folders = len({label for _, label in samples})
            source = "image_folder"
            if not samples:
                raise SystemExit(f"no images found under {root}")
            if "" in class_to_idx:  # timm's reader names images lying in the root itself class ''
                raise SystemExit(
                    f"{root} holds images directly, not in one folder per class (the raw ILSVRC2012 val "
                    "layout?): give --labels-file with path,label rows, or sort the images into wnid folders"
                )
            if not_images:
                warn(
                    f"{len(not_images)} file(s) under {root} are not evaluated: timm reads only "
                    f"{', '.join(sorted(get_img_extensions(as_set=True)))} ({', '.join(not_images[:5])}"
                    f"{' …' if len(not_images) > 5 else ''}; all in the JSON's data.not_images): convert them to evaluate them"
                )
            if args.class_map and len(class_to_idx) != num_classes:
                warn(
                    f"--class-map names {len(class_to_idx)} classes but the model has {num_classes}: labels are "
                    "the map's line numbers and match the model's classes only if its lines are the model's "
                    f"first {len(class_to_idx)} classes, in order (give the model's full class list otherwise)"
                )
            elif not args.class_map and len(class_to_idx) != num_classes:
                warn(
                    f"{root} has {len(class_to_idx)} class folders but the model has {num_classes} classes: labels "
                    "are indices of the sorted folder names and match the model's classes only if every class "
                    "is present (give --class-map otherwise)"
                )
        if args.limit is not None:
            samples = samples[: args.limit]
        bad_labels = sorted({label for _, label in samples if not 0 <= label < num_classes})
        if bad_labels:
            needed = max(bad_labels) + 1
            if class_to_idx is not None:
                names = [name for name, index in class_to_idx.items() if index >= num_classes]
                fix = (f"{len(class_to_idx)} class folders ({_first_names(names)} beyond the model's): give --class-map "
                       f"naming the model's classes, or a model of {needed} classes (--num-classes {needed})")
            else:
                fix = f"correct the labels, or give a model of {needed} classes (--num-classes {needed})"
            raise SystemExit(f"labels {bad_labels[:10]} are outside the model's {num_classes} classes: {fix}")
        real_map = _load_real_labels(args.real_labels) if args.real_labels else None

        dataset = EvalDataset(samples, transform)
        loader = DataLoader(
            dataset,
            batch_size=args.batch_size,
            sampler=ShardSampler(len(dataset), ddp.rank, ddp.world_size),
            num_workers=args.workers,
            collate_fn=collate,
            pin_memory=device.type == "cuda",
        )

        # Evaluation.
        eval_started = time.perf_counter()
        correct = dict.fromkeys(TOPK, 0.0)
        real_hits = dict.fromkeys(TOPK, 0.0)
        real_counted = 0
        evaluated = 0
        failures: list[tuple[int, str]] = []
        bench_input: Tensor | None = None
        progress = tqdm(
            loader, desc=f"{args.model} {args.method}", unit="batch", disable=not lead or args.quiet, file=sys.stderr
        )
        with torch.inference_mode():
            for batch in progress:
                failures.extend(batch.failures)
                if batch.images is None:
                    continue
                images = batch.images.to(device, non_blocking=True)
                with autocast(device, dtype):
                    logits = model(images)
                logits = logits.float()
                if logits.shape != (images.shape[0], num_classes):
                    raise RuntimeError(
                        f"expected logits of shape {(images.shape[0], num_classes)}, got {tuple(logits.shape)}"
                    )
                for k, count in topk_correct(logits, batch.labels.to(device), ks).items():
                    correct[k] += count
                if real_map is not None:
                    lists = [real_map.get(os.path.basename(samples[i][0])) for i in batch.indices]
                    hits, counted = real_correct(logits, lists, ks)
                    for k, count in hits.items():
                        real_hits[k] += count
                    real_counted += counted
                evaluated += images.shape[0]
                # Keep the first full batch (or the largest seen) for the model-only timing.
                if bench_input is None or (
                    bench_input.shape[0] < args.batch_size and images.shape[0] > bench_input.shape[0]
                ):
                    bench_input = images

        totals = ddp.all_sum([evaluated, len(failures), *correct.values(), *real_hits.values(), real_counted], device)
        evaluated, unreadable = totals[0], totals[1]
        correct = dict(zip(TOPK, totals[2 : 2 + len(TOPK)]))
        real_hits = dict(zip(TOPK, totals[2 + len(TOPK) : 2 + 2 * len(TOPK)]))
        real_counted = totals[-1]
        all_failures = sorted(f for part in ddp.gather(failures) for f in part)
        eval_wall = time.perf_counter() - eval_started
        if evaluated + unreadable != len(samples) or len(all_failures) != unreadable:
            raise RuntimeError(
                f"count mismatch: {evaluated} evaluated + {unreadable} unreadable != {len(samples)} images"
            )
        if unreadable:
            warn(
                f"{unreadable} of {len(samples)} images could not be read (listed under unreadable_files); "
                f"accuracy is over the {evaluated} read"
            )
        if real_map is not None and real_counted == 0:
            warn("--real-labels given but no evaluated image has a ReaL label (file names ILSVRC2012_val_*.JPEG)")

        # Model-only throughput on a batch already on the device.
        throughput: dict[str, Any] | None = None
        if not args.no_bench and bench_input is not None:
            default_warmup, default_runs = BENCH_DEFAULTS.get(device.type, BENCH_DEFAULTS["cuda"])
            warmup = default_warmup if args.warmup is None else args.warmup
            runs = default_runs if args.runs is None else args.runs
            timing = measure_throughput(model, bench_input, warmup=warmup, runs=runs, dtype=dtype)
            per_rank = ddp.gather(timing["images_per_s"])
            throughput = {
                "images_per_s": timing["images_per_s"],
                "median_s": timing["median_s"],
                "times_s": timing["times"],
                "batch_size": int(bench_input.shape[0]),
                "warmup": warmup,
                "runs": runs,
                "images_per_s_per_rank": per_rank,
                "what": "model only (rank 0): one evaluation batch already on the device, median of timed "
                "passes after warm-up, device synchronised around each",
            }
        elif not args.no_bench:
            ddp.gather(None)  # keep the ranks' collectives matched

        env = environment(device)
        document: dict[str, Any] = {
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command_line("evals.imagenet", argv),
            "config": jsonable(vars(args)),
            "model": {
                "name": args.model,
                "weights": "pretrained" if args.pretrained else str(args.checkpoint) if args.checkpoint else "random",
                "num_classes": num_classes,
                "method": args.method,
                "options": jsonable(options),
                "setting": describe_setting(args.method, options),
                "data_config": jsonable(data_config),
            },
            "data": {
                "source": source,
                "root": str(root),
                "num_class_folders": num_class_folders,
                "not_images": not_images,  # files timm's reader leaves out by extension
            },
            "environment": env,
            "world_size": ddp.world_size,
            "dtype": args.dtype,
            "counts": {"images": len(samples), "evaluated": evaluated, "unreadable": unreadable},
            **{
                f"top{k}": {"correct": correct[k], "pct": _pct(correct[k], evaluated)} if k in ks else None
                for k in TOPK
            },
            "real": None
            if real_map is None
            else {
                "evaluated": real_counted,
                **{
                    f"top{k}": {"correct": real_hits[k], "pct": _pct(real_hits[k], real_counted)} if k in ks else None
                    for k in TOPK
                },
            },
            "unreadable_files": [{"path": samples[i][0], "error": error} for i, error in all_failures],
            "throughput": throughput,
            "gflops_per_image": gflops,
            "gflops_per_image_unreduced": gflops_unreduced,
            "gflops_note": gflops_note
            or "tokenprune.flops: 2 FLOPs per multiply-add (halve for papers' GFLOPs); matmuls, convs, attention",
            "tokens_per_block": tokens,
            "eval_wall_time_s": eval_wall,
            "total_wall_time_s": time.perf_counter() - started,
            "warnings": warnings,
        }
        if lead:
            out = (
                args.out or RESULTS_DIR / f"imagenet_{re.sub(r'[^A-Za-z0-9_.-]+', '_', args.model)}_{args.method}.json"
            )
            write_atomic(out, json.dumps(document, indent=2, allow_nan=False) + "\n")
            top5 = document["top5"]
            summary = [
                f"{args.model} {args.method}{' ' + json.dumps(document['model']['options']) if options else ''}: "
                f"top-1 {_count(correct[1])}/{evaluated} ({_format_pct(_pct(correct[1], evaluated))})",
            ]
            if top5 is not None:
                summary.append(f"top-5 {_count(top5['correct'])}/{evaluated} ({_format_pct(top5['pct'])})")
            if document["real"] is not None:
                summary.append(f"ReaL top-1 {_count(real_hits[1])}/{real_counted}")
            summary.append(f"unreadable {unreadable}")
            if throughput is not None:
                summary.append(f"model-only {throughput['images_per_s']:.1f} img/s (batch {throughput['batch_size']})")
            if gflops is not None:
                summary.append(f"{gflops:.2f} GFLOPs/img")
            summary.append(f"eval {eval_wall:.1f} s")
            print("; ".join(summary))
            print(f"wrote {out}")
        return document
    finally:
        ddp.close()


def cli() -> None:
    """The console script: ``main`` returns its results to Python callers, which
    ``sys.exit`` would print and turn into exit status 1."""
    main()


if __name__ == "__main__":
    cli()
