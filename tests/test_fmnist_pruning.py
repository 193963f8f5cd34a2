"""The Fashion-MNIST evidence pipeline end to end on a tiny synthetic idx folder: the reader,
then ``evals.fmnist_pruning`` with a backbone and a DynamicViT checkpoint saved here."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tokenprune
from evals import fmnist_pruning, train_dynamicvit
from evals.fashion_mnist import FashionMNIST

pytest.importorskip("safetensors")


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def idx_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 12), ("t10k", 20)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count) % 10)
    return root


def test_reader_refuses_files_that_are_not_what_their_header_says(idx_folder: Path, tmp_path: Path) -> None:
    from evals.fashion_mnist import read_idx

    good = idx_folder / "t10k-labels-idx1-ubyte.gz"
    assert read_idx(good).tolist() == [i % 10 for i in range(20)]
    with gzip.open(good) as handle:
        raw = handle.read()
    for name, data, message in (
        ("float", raw[:2] + b"\x0d" + raw[3:], "not an IDX file of unsigned bytes"),
        ("truncated", raw[:-1], "truncated or corrupt"),
        ("long", raw + b"\x00", "truncated or corrupt"),
    ):
        with gzip.open(tmp_path / name, "wb") as handle:
            handle.write(data)
        with pytest.raises(ValueError, match=message):
            read_idx(tmp_path / name)
    # images and labels that disagree in number
    mismatched = tmp_path / "mismatched"
    mismatched.mkdir()
    for path in idx_folder.iterdir():
        (mismatched / path.name).write_bytes(path.read_bytes())
    write_idx(mismatched / "t10k-labels-idx1-ubyte.gz", np.arange(19) % 10)
    with pytest.raises(ValueError, match="20 test images but 19 labels"):
        FashionMNIST(mismatched, "test")
    # the test split alone: the training split's files are named, with where to get them
    test_only = tmp_path / "test_only"
    test_only.mkdir()
    for path in idx_folder.glob("t10k-*"):
        (test_only / path.name).write_bytes(path.read_bytes())
    with pytest.raises(FileNotFoundError, match=r"no train-images-idx3-ubyte.gz or train-labels-idx1-ubyte.gz .*fashion_mnist.py"):
        FashionMNIST(test_only, "train")


def test_reader_matches_the_idx_bytes(idx_folder: Path) -> None:
    data = FashionMNIST(idx_folder, "test")
    assert len(data) == 20
    image, label = data[13]
    assert image.shape == (1, 28, 28) and label == 3
    with gzip.open(idx_folder / "t10k-images-idx3-ubyte.gz") as handle:
        raw = np.frombuffer(handle.read(), dtype=np.uint8, offset=16).reshape(20, 28, 28)
    expected = (torch.from_numpy(raw[13].astype(np.float32)) / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(image[0], expected)
    with pytest.raises(FileNotFoundError, match="fashion_mnist"):
        FashionMNIST(idx_folder / "missing", "test")


def test_pruning_table_end_to_end(idx_folder: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    backbone = train_dynamicvit.create_model("fmnist_vit")
    save_file(backbone.state_dict(), str(tmp_path / "backbone.safetensors"))
    learned = tokenprune.patch(train_dynamicvit.create_model("fmnist_vit"), "dynamicvit")
    save_file(learned.state_dict(), str(tmp_path / "dynamicvit.safetensors"))  # whole fine-tuned model

    rows = fmnist_pruning.main([
        "--data", str(idx_folder), "--backbone", str(tmp_path / "backbone.safetensors"),
        "--dynamicvit", str(tmp_path / "dynamicvit.safetensors"), "--random-draws", "3", "--out-dir", str(tmp_path),
        "--keep-ratio", "0.5",  # not any method's default keep ratio (0.7)
    ])
    methods = [r["method"] for r in rows]
    assert methods[0] == "unreduced" and any(m.startswith("learned dropping (DynamicViT, fine-tuned)") for m in methods)
    random_row = next(r for r in rows if r["method"].startswith("random dropping"))
    assert len(random_row["top1_draws"]) == 3
    assert random_row["top1"] == pytest.approx(sum(random_row["top1_draws"]) / 3)
    for row in rows:
        assert row["delta_vs_unreduced"] == pytest.approx(row["top1"] - rows[0]["top1"])
    assert all(0 <= r["top1"] <= 100 and r["gflops"] <= rows[0]["gflops"] + 1e-12 for r in rows)
    # the unreduced row is the plain backbone's accuracy on the 20 images
    with torch.no_grad():
        images = torch.stack([FashionMNIST(idx_folder, "test")[i][0] for i in range(20)])
        expected = 100.0 * (backbone.eval()(images).argmax(-1) == torch.arange(20) % 10).float().mean().item()
    assert rows[0]["top1"] == pytest.approx(expected)
    # The EViT and ToMe rows: a directly patched backbone's accuracy; ToMe's r is the one whose
    # GFLOPs come closest to the learned row's (no r from 0 to 29 closer).
    learned_row = next(r for r in rows if r["method"].startswith("learned dropping"))
    learned_model = tokenprune.patch(train_dynamicvit.create_model("fmnist_vit"), "dynamicvit", keep_ratio=0.5)
    assert learned_row["gflops"] == pytest.approx(tokenprune.flops(learned_model, 28).gflops)
    # random dropping: draw k is the accuracy with the global generator seeded k
    from torch.utils.data import DataLoader

    dropping = tokenprune.patch(copy.deepcopy(backbone), "evit", keep_ratio=0.5, fuse=False, score="random")
    loader = DataLoader(FashionMNIST(idx_folder, "test"), batch_size=500)
    draws = [100.0 * fmnist_pruning.correct(dropping, loader, seed=seed).mean().item() for seed in range(3)]
    assert random_row["top1_draws"] == pytest.approx(draws)
    checked = 0
    for row in rows:
        if row["method"].startswith("attention dropping (EViT"):
            model = tokenprune.patch(copy.deepcopy(backbone), "evit", keep_ratio=0.5, fuse=True)
        elif row["method"].startswith("attention dropping (no fusion)"):
            model = tokenprune.patch(copy.deepcopy(backbone), "evit", keep_ratio=0.5, fuse=False)
        elif row["method"].startswith("ToMe"):
            r = int(row["method"].split("r=")[1].split()[0])
            gaps = [abs(tokenprune.flops(tokenprune.patch(copy.deepcopy(backbone), r=k), 28).gflops - learned_row["gflops"])
                    for k in range(30)]
            assert gaps[r] == min(gaps)
            model = tokenprune.patch(copy.deepcopy(backbone), r=r)
        else:
            continue
        with torch.no_grad():
            accuracy = 100.0 * (model.eval()(images).argmax(-1) == torch.arange(20) % 10).float().mean().item()
        assert row["top1"] == pytest.approx(accuracy), row["method"]
        # fused or not, the rows differ in their token counts (the fused token) if not in accuracy
        assert (row["gflops"], row["output_tokens"]) == (tokenprune.flops(model, 28).gflops, tokenprune.plan(model, 28).output_tokens)
        checked += 1
    assert checked == 3
    saved = json.loads((tmp_path / "fmnist_pruning.json").read_text())
    assert [r["method"] for r in saved["rows"]] == methods
    assert (tmp_path / "fmnist_pruning.md").read_text().count("\n| ") == len(rows) + 2  # header, rule, rows
    assert (tmp_path / "fmnist_pruning.png").stat().st_size > 0
    # each reduced row against the matched ToMe row, image by image: the mean paired difference
    # is the difference of the accuracies, and its interval holds it
    tome_row = next(r for r in rows if r["method"].startswith("ToMe"))
    compared = [r for r in rows if "vs_tome" in r]
    assert len(compared) == 4 and tome_row not in compared and rows[0] not in compared
    for row in compared:
        d = row["vs_tome"]
        assert d["mean"] == pytest.approx(row["top1"] - tome_row["top1"])
        assert d["low"] <= d["mean"] <= d["high"]
        assert d["verdict"] == ("win" if d["low"] > 0 else "loss" if d["high"] < 0 else "tie")


@pytest.mark.parametrize("rho", ["1.5", "0", "-0.3", "nan"])
def test_a_keep_ratio_out_of_range_is_refused_before_the_data_is_read(rho: str, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``--keep-ratio 1.5`` ran the unreduced row over the whole test split, then died in patch
    with a ValueError traceback; it is now a usage error before any image is read."""
    monkeypatch.setattr(fmnist_pruning, "FashionMNIST", lambda *args, **kwargs: pytest.fail("read the data first"))
    with pytest.raises(SystemExit) as stopped:
        fmnist_pruning.main(["--data", str(tmp_path), "--keep-ratio", "0.7", rho, "--out-dir", str(tmp_path)])
    assert stopped.value.code == 2  # argparse's usage error, with its message on stderr
    assert not (tmp_path / "fmnist_pruning.json").exists()


def test_matched_tome_r_is_the_nearest_in_gflops_from_r_0() -> None:
    """nearest_tome_r searches r = 0 ... 29: the unreduced GFLOPs are matched by r=0, and any
    target by the r whose GFLOPs are nearest."""
    model = train_dynamicvit.create_model("fmnist_vit")
    gflops = [tokenprune.flops(tokenprune.patch(copy.deepcopy(model), r=r), 28).gflops for r in range(30)]
    assert fmnist_pruning.nearest_tome_r(model, 28, gflops[0]) == 0
    target = (gflops[3] + 2 * gflops[4]) / 3  # nearer r=4 than r=3
    assert fmnist_pruning.nearest_tome_r(model, 28, target) == min(range(30), key=lambda r: abs(gflops[r] - target)) == 4


def test_reader_finds_debian_s_layout_and_refuses_other_splits(idx_folder: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(idx_folder, tmp_path / "usr/share/datasets/fashion-mnist")
    flat, debian = FashionMNIST(idx_folder, "test"), FashionMNIST(tmp_path, "test")
    assert len(debian) == len(flat) and torch.equal(debian[7][0], flat[7][0])
    with pytest.raises(ValueError, match="split"):
        FashionMNIST(idx_folder, "val")


def test_augmentation_shifts_by_up_to_2_pixels_over_black_and_flips_horizontally(idx_folder: Path) -> None:
    """Each augmented image is the 28x28 window, at an offset of -2 ... 2 pixels each way, of the
    image padded with black, flipped left-right or not; every offset and both flips occur."""
    with gzip.open(idx_folder / "train-images-idx3-ubyte.gz") as handle:
        raw = np.frombuffer(handle.read(), dtype=np.uint8, offset=16).reshape(12, 28, 28)
    padded = torch.from_numpy(np.pad(raw[5], 2).astype(np.float32))  # black (0) border
    candidates = {}
    for top in range(5):
        for left in range(5):
            window = (padded[top : top + 28, left : left + 28] / 255 - 0.2860) / 0.3530
            candidates[(top - 2, left - 2, False)], candidates[(top - 2, left - 2, True)] = window, window.flip(-1)
    data = FashionMNIST(idx_folder, "train", augment=True)
    torch.manual_seed(0)
    seen = set()
    for _ in range(300):
        image, label = data[5]
        assert image.shape == (1, 28, 28) and label == 5
        (match,) = [key for key, window in candidates.items() if torch.allclose(image[0], window)]
        seen.add(match)
    assert {(down, right) for down, right, _ in seen} == {(i, j) for i in range(-2, 3) for j in range(-2, 3)}
    assert {flip for _, _, flip in seen} == {False, True}


def test_plot_takes_draws_that_all_equal_their_mean(tmp_path: Path) -> None:
    """One random draw (or identical draws): top1, their mean, can exceed every draw in the last
    bit; the error bar is 0, not a negative length matplotlib refuses."""
    rows = [
        {"family": "predictors", "gflops": 0.002, "top1": 80.0},
        {"family": "random dropping", "gflops": 0.002, "top1": 11.600000000000001, "top1_draws": [11.6]},
        {"family": "random dropping", "gflops": 0.003, "top1": 11.6, "top1_draws": [11.600000000000001]},
    ]
    fmnist_pruning.plot(rows, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")
