"""One-epoch smoke runs of the training script on a tiny ImageFolder, and checkpoint reuse."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tokenprune
from evals import train_dynamicvit
from tokenprune.methods.dynamicvit import predictors

pytest.importorskip("safetensors")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split in ("train", "validation"):
        for label, colour in (("dark", 40), ("light", 200)):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(4):
                pixels = np.clip(rng.normal(colour, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


COMMON = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--num-classes", "2", "--batch-size", "4",
          "--workers", "0", "--warmup-steps", "1"]


def test_backbone_then_predictors_then_resume(image_folder: Path, tmp_path: Path) -> None:
    backbone = tmp_path / "backbone"
    summary = train_dynamicvit.main(["--data", str(image_folder), *COMMON, "--method", "none", "--epochs", "1", "--out", str(backbone)])
    assert summary["val_images"] == 8 and 0 <= summary["val_top1"] <= 100
    assert (backbone / "model.safetensors").is_file()

    run = tmp_path / "dvit"
    args = ["--data", str(image_folder), *COMMON, "--checkpoint", str(backbone / "model.safetensors"), "--out", str(run)]
    train_dynamicvit.main([*args, "--epochs", "1"])
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [0]
    assert {"train_loss", "train_cls", "train_ratio", "train_distill", "train_token"} <= set(log[0])

    # the backbone stayed frozen: only the predictors were written, and they load into a patched model
    assert (run / "predictors.safetensors").is_file() and not (run / "model.safetensors").exists()
    model = train_dynamicvit.create_model("vit_tiny_patch16_224", num_classes=2, img_size=32)
    train_dynamicvit.load_weights(model, backbone / "model.safetensors")
    tokenprune.patch(model, "dynamicvit", predictor=str(run / "predictors.safetensors"))
    assert len(predictors(model)) == 3
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 2)

    # Resume at learning rate 0: epoch 1 must start from epoch 0's predictors (reloaded, not
    # freshly initialised) and leave them as they were; the step count carries on.
    from safetensors.torch import load_file

    after_epoch_0 = load_file(str(run / "predictors.safetensors"))
    train_dynamicvit.main([*args, "--epochs", "2", "--resume", "--lr", "0"])  # continues at epoch 1
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [0, 1]
    assert log[1]["steps"] == 2 * log[0]["steps"] > 0
    assert all(math.isfinite(entry["train_loss"]) for entry in log)  # 4 patches: all can be dropped
    after_epoch_1 = load_file(str(run / "predictors.safetensors"))
    assert after_epoch_1.keys() == after_epoch_0.keys()
    assert all(torch.equal(after_epoch_1[k], after_epoch_0[k]) for k in after_epoch_0)


def test_cosine_lr_warms_up_linearly_then_follows_the_cosine() -> None:
    lr = [train_dynamicvit.cosine_lr(step, total=10, warmup=2, base=1.0) for step in range(11)]
    assert lr[:2] == [0.5, 1.0]
    for step in range(2, 11):
        assert lr[step] == pytest.approx(0.5 * (1 + math.cos(math.pi * (step - 2) / 8)))
    assert lr[10] == pytest.approx(0.0, abs=1e-12)


def test_bad_checkpoint_names_the_keys(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"unexpected.weight": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    model = train_dynamicvit.create_model("vit_tiny_patch16_224", num_classes=2, img_size=32)
    with pytest.raises(ValueError, match="unexpected.weight"):
        train_dynamicvit.load_weights(model, tmp_path / "bad.safetensors")


def test_backbone_trains_at_a_fraction_of_the_predictor_rate() -> None:
    """DynamicViT's recipe: predictors at the base rate, the backbone at 0.01× (each parameter once)."""
    model = tokenprune.patch(train_dynamicvit.create_model("fmnist_vit"), "dynamicvit")
    args = argparse.Namespace(method="dynamicvit", train_backbone=True, backbone_lr_scale=0.01)
    groups = train_dynamicvit.parameter_groups(model, args)
    assert [g["lr_scale"] for g in groups] == [1.0, 0.01]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in predictors(model).parameters()}
    everything = [id(p) for g in groups for p in g["params"]]
    assert sorted(everything) == sorted(id(p) for p in model.parameters())

    args.train_backbone = False  # frozen backbone: only the predictors reach the optimizer
    assert [len(g["params"]) for g in train_dynamicvit.parameter_groups(model, args)] == [len(groups[0]["params"])]
