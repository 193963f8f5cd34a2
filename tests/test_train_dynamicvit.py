"""Short runs of the training script on a tiny ImageFolder: checkpoints, resuming, AMP, DDP."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tokenprune
from evals import train_dynamicvit
from tokenprune.methods.dynamicvit import DynamicViTLoss, DynamicViTOutput, predictors

REPO = Path(__file__).resolve().parents[1]

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


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_backbone_then_predictors(image_folder: Path, tmp_path: Path) -> None:
    backbone = tmp_path / "backbone"
    summary = train_dynamicvit.main(["--data", str(image_folder), *COMMON, "--method", "none", "--epochs", "1", "--out", str(backbone)])
    assert summary["val_images"] == 8 and 0 <= summary["val_top1"] <= 100
    assert (backbone / "model.safetensors").is_file()

    run = tmp_path / "dvit"
    train_dynamicvit.main(["--data", str(image_folder), *COMMON, "--checkpoint", str(backbone / "model.safetensors"), "--out", str(run), "--epochs", "1"])
    log = _log(run)
    assert [entry["epoch"] for entry in log] == [0]
    assert {"train_loss", "train_cls", "train_ratio", "train_distill", "train_token"} <= set(log[0])
    assert math.isfinite(log[0]["train_loss"])  # 4 patches: a draw can drop them all

    # the backbone stayed frozen: only the predictors were written, and they load into a patched model
    assert (run / "predictors.safetensors").is_file() and not (run / "model.safetensors").exists()
    assert not list(run.glob(".*.tmp"))  # atomic writes leave no temporaries
    model = train_dynamicvit.create_model("vit_tiny_patch16_224", num_classes=2, img_size=32)
    train_dynamicvit.load_weights(model, backbone / "model.safetensors")
    tokenprune.patch(model, "dynamicvit", predictor=str(run / "predictors.safetensors"))
    assert len(predictors(model)) == 3
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 2)


@pytest.mark.parametrize(("train_backbone", "workers"), [(False, 0), (True, 1)])
def test_resume_continues_bit_identically(image_folder: Path, tmp_path: Path, train_backbone: bool, workers: int) -> None:
    """Two epochs in one run == one epoch, stop, --resume for the second: the same weights to the
    bit. That needs the weights, the optimizer's moments, the step and the same random draws
    (data order, augmentation in the loader's workers, Gumbel noise) as an uninterrupted run.
    The schedule stays in warm-up so that it does not depend on --epochs."""
    from safetensors.torch import load_file

    args = ["--data", str(image_folder), *COMMON, "--warmup-steps", "100", "--lr", "0.01", "--workers", str(workers)]
    args += ["--train-backbone"] if train_backbone else []
    weights = "model.safetensors" if train_backbone else "predictors.safetensors"
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train_dynamicvit.main([*args, "--epochs", "2", "--out", str(straight)])
    train_dynamicvit.main([*args, "--epochs", "1", "--out", str(stopped)])
    after_one = {key: value.clone() for key, value in load_file(str(stopped / weights)).items()}  # (not the file's map)
    # As if the second epoch's weights were written and the run stopped before its state: the
    # state alone says which epoch is complete, and holds that epoch's weights.
    shutil.copy(straight / weights, stopped / weights)
    train_dynamicvit.main([*args, "--epochs", "2", "--out", str(stopped), "--resume"])

    assert [entry["epoch"] for entry in _log(stopped)] == [0, 1]
    assert _log(stopped)[1]["steps"] == _log(straight)[1]["steps"] == 2 * _log(stopped)[0]["steps"] > 0
    expected, resumed = load_file(str(straight / weights)), load_file(str(stopped / weights))
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)
    assert not all(torch.equal(resumed[k], after_one[k]) for k in expected)  # the second epoch trained


def test_resume_refuses_what_it_cannot_continue(image_folder: Path, tmp_path: Path, capsys) -> None:
    args = ["--data", str(image_folder), *COMMON, "--max-steps", "1", "--out", str(tmp_path)]
    with pytest.raises(SystemExit):  # nothing to resume yet: argparse's error, not a fresh start
        train_dynamicvit.main([*args, "--resume"])
    with pytest.raises(SystemExit):
        train_dynamicvit.main([*args, "--epochs", "0"])  # would train and write nothing
    assert "--epochs must be ≥ 1, got 0" in capsys.readouterr().err
    train_dynamicvit.main([*args, "--epochs", "1"])
    # a new run there would overwrite its checkpoint and mix its log lines with this run's
    with pytest.raises(SystemExit):
        train_dynamicvit.main([*args, "--epochs", "1", "--keep-ratio", "0.5"])
    assert "holds a run already (train_state.pt): add --resume to continue it" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"keep_ratio.*\(0\.7, 0\.5\)"):
        train_dynamicvit.main([*args, "--epochs", "2", "--resume", "--keep-ratio", "0.5"])
    # the frozen backbone is not in the run's files: resuming without its --checkpoint would
    # train the predictors on another backbone
    with pytest.raises(SystemExit, match="checkpoint"):
        train_dynamicvit.main([*args, "--epochs", "2", "--resume", "--checkpoint", str(tmp_path / "other.safetensors")])
    with pytest.raises(SystemExit, match="trained 1 epochs already; pass a larger --epochs"):
        train_dynamicvit.main([*args, "--epochs", "1", "--resume"])
    # switching to bfloat16 on resume keeps going (the saved run had no loss scale, nor needs one)
    train_dynamicvit.main([*args, "--epochs", "2", "--resume", "--dtype", "bfloat16"])
    assert [entry["epoch"] for entry in _log(tmp_path)] == [0, 1]
    # a state from before weight decay had its own parameter groups: one group, decayed throughout
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    state["optimizer"]["param_groups"] = [{**groups[0], "params": [i for g in groups for i in g["params"]]}]
    torch.save(state, tmp_path / "train_state.pt")
    with pytest.raises(SystemExit, match=r"older version of this script \(its optimizer has 1 parameter groups, this one 2\)"):
        train_dynamicvit.main([*args, "--epochs", "3", "--resume"])
    # a state from before the run's configuration was saved
    torch.save({"optimizer": {}, "epoch": 0, "step": 1}, tmp_path / "train_state.pt")
    with pytest.raises(SystemExit, match="older version"):
        train_dynamicvit.main([*args, "--epochs", "3", "--resume"])


def test_float16_trains_with_loss_scaling(image_folder: Path, tmp_path: Path) -> None:
    train_dynamicvit.main(["--data", str(image_folder), *COMMON, "--max-steps", "1", "--epochs", "1",
                           "--dtype", "float16", "--out", str(tmp_path)])  # fmt: skip
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 1  # the scaler ran (a disabled one saves no state)
    assert math.isfinite(_log(tmp_path)[0]["train_loss"])


def test_label_smoothing_reaches_the_dynamicvit_loss() -> None:
    logits = torch.tensor([[4.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    output = DynamicViTOutput(logits, torch.zeros(2, 1, 3), [])
    for smoothing in (0.0, 0.1):
        loss = DynamicViTLoss(label_smoothing=smoothing)(output, labels, logits, torch.zeros(2, 1, 3))
        log_p = torch.log_softmax(logits, dim=-1)
        expected = -((1 - smoothing) * log_p.gather(1, labels[:, None]).squeeze(1) + smoothing * log_p.mean(-1)).mean()
        assert loss["cls"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_two_processes_train_in_sync(tmp_path: Path) -> None:
    """torchrun with two CPU processes (gloo): each rank its own batches, one set of weights
    (the script stops if the ranks' weights differ), and every validation image counted once
    over an uneven split (5 images)."""
    rng = np.random.default_rng(1)
    for split, count in (("train", 4), ("validation", 5)):
        for label in ("a", "b"):
            folder = tmp_path / "data" / split / label
            folder.mkdir(parents=True)
            for i in range(count if label == "a" else count - (split == "validation") * 3):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "evals.train_dynamicvit", "--data", str(tmp_path / "data"), *COMMON, "--lr", "0.01",
               "--epochs", "1", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    log = _log(out)
    assert len(log) == 1 and log[0]["val_images"] == 7  # 5 + 2, no padding to an even split
    assert log[0]["steps"] == 1  # 8 training images, 2 ranks × batch 4


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
    with pytest.raises(SystemExit, match="unexpected.weight"):
        train_dynamicvit.load_weights(model, tmp_path / "bad.safetensors")


def test_backbone_trains_at_a_fraction_of_the_predictor_rate() -> None:
    """DynamicViT's recipe: predictors at the base rate, the backbone at 0.01× (each parameter once)."""
    model = tokenprune.patch(train_dynamicvit.create_model("fmnist_vit"), "dynamicvit")
    args = argparse.Namespace(method="dynamicvit", train_backbone=True, backbone_lr_scale=0.01, weight_decay=0.05)
    groups = train_dynamicvit.parameter_groups(model, args)
    assert [g["lr_scale"] for g in groups] == [1.0, 1.0, 0.01, 0.01]
    assert {id(p) for g in groups[:2] for p in g["params"]} == {id(p) for p in predictors(model).parameters()}
    everything = [id(p) for g in groups for p in g["params"]]
    assert sorted(everything) == sorted(id(p) for p in model.parameters())

    args.train_backbone = False  # frozen backbone: only the predictors reach the optimizer
    assert [len(g["params"]) for g in train_dynamicvit.parameter_groups(model, args)] == [len(g["params"]) for g in groups[:2]]


@pytest.mark.parametrize("method", ["dynamicvit", "none"])
def test_weight_decay_spares_biases_norms_and_embeddings(method: str) -> None:
    """DynamicViT's (and DeiT's) recipe decays weight matrices only: no decay on biases, LayerNorm
    weights, the class token or the position embedding, which AdamW's decoupled decay would pull
    towards zero at every step (the backbone's and the predictors' alike)."""
    model = train_dynamicvit.create_model("fmnist_vit")
    if method == "dynamicvit":
        tokenprune.patch(model, "dynamicvit")
    args = argparse.Namespace(method=method, train_backbone=True, backbone_lr_scale=0.01, weight_decay=0.05)
    optimizer = torch.optim.AdamW(train_dynamicvit.parameter_groups(model, args), lr=1e-3, weight_decay=args.weight_decay)  # as main's
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():  # the rule by name, independently of the shapes
        exempt = name.endswith(".bias") or ".norm" in name or name.startswith("norm.") or "in_conv.0." in name or name in ("cls_token", "pos_embed")
        assert decay[id(p)] == (0.0 if exempt else 0.05), name
    assert sum(d == 0.05 for d in decay.values()) > 0 and sum(d == 0.0 for d in decay.values()) > 0


def test_fixed_configurations_refuse_arguments_they_would_ignore() -> None:
    with pytest.raises(ValueError, match="drop num_classes, img_size"):
        train_dynamicvit.create_model("fmnist_vit", num_classes=3, img_size=32)
    assert train_dynamicvit.create_model("fmnist_vit").num_classes == 10


def _run(data: Path, out: Path, *extra: str) -> dict:
    """A one-step run of the plain model (the data checks run before anything trains)."""
    return train_dynamicvit.main(["--data", str(data), *COMMON, "--method", "none", "--epochs", "1", "--max-steps", "1",
                                  "--out", str(out), *extra])  # fmt: skip


def test_data_without_split_folders_is_refused(image_folder: Path, tmp_path: Path) -> None:
    """timm falls back to the root folder for a split it cannot find: training images would be
    validated on, silently. The script looks for the splits itself and names what is missing."""
    import shutil

    flat = tmp_path / "flat"  # the class folders directly under --data
    shutil.copytree(image_folder / "train", flat)
    with pytest.raises(SystemExit, match=r"no training folder \(train/ or training/\) and no validation folder.*"
                                         r"/train/<class>/.*/validation/<class>/"):  # fmt: skip
        _run(flat, tmp_path / "run")
    only_train = tmp_path / "only_train"
    shutil.copytree(image_folder / "train", only_train / "train")
    with pytest.raises(SystemExit, match=r"no validation folder \(validation/ or val/ or .*\)") as error:
        _run(only_train, tmp_path / "run")
    assert "training folder" not in str(error.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written

    synonyms = tmp_path / "synonyms"  # timm's other names for the splits are found too
    shutil.copytree(image_folder / "train", synonyms / "training")
    shutil.copytree(image_folder / "validation", synonyms / "val")
    (synonyms / "val" / "light" / "0.png").unlink()  # tell the splits apart: 7 validation images
    assert _run(synonyms, tmp_path / "run")["val_images"] == 7


def test_splits_with_other_classes_are_refused(image_folder: Path, tmp_path: Path) -> None:
    """Labels are indices into each split's sorted class folders: with another set of folders the
    validation labels would name other classes than the training labels."""
    import shutil

    shutil.copytree(image_folder, tmp_path / "data")
    shutil.copytree(image_folder / "validation" / "dark", tmp_path / "data" / "validation" / "dim")
    with pytest.raises(SystemExit, match=r"class folders differ.*only in .*validation: \['dim'\]"):
        _run(tmp_path / "data", tmp_path / "run")


def test_a_training_set_smaller_than_the_batch_is_refused(image_folder: Path, tmp_path: Path, capsys) -> None:
    """The loader drops the last, incomplete batch: 8 images in batches of 16 make no step at all,
    and the run would write an untrained model.safetensors as if it had trained."""
    with pytest.raises(SystemExit, match=r"8 training images < batch size 16: lower --batch-size"):
        _run(image_folder, tmp_path / "run", "--batch-size", "16")
    assert not (tmp_path / "run" / "model.safetensors").exists()
    # --max-steps 0 used to mean "no limit"
    with pytest.raises(SystemExit):
        _run(image_folder, tmp_path / "run", "--max-steps", "0")
    assert "--max-steps must be ≥ 1, got 0" in capsys.readouterr().err


def test_the_model_must_have_the_data_s_class_count(image_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"has 2 class folders but the model has 3 classes.*pass --num-classes 2"):
        _run(image_folder, tmp_path / "run", "--num-classes", "3")  # the last --num-classes wins
    # a project configuration has its own class count: it cannot take --num-classes
    with pytest.raises(SystemExit, match=r"fmnist_vit has 10 classes.*timm --model with --num-classes 2"):
        train_dynamicvit.check_num_classes(train_dynamicvit.create_model("fmnist_vit"), 2, "DATA", "fmnist_vit")
    train_dynamicvit.check_num_classes(train_dynamicvit.create_model("fmnist_vit"), 10, "DATA", "fmnist_vit")
    # Fashion-MNIST's idx files have classes, not folders
    tiny = train_dynamicvit.create_model("vit_tiny_patch16_224", img_size=32)
    with pytest.raises(SystemExit, match=r"FMNIST has 10 classes but the model has 1000 classes: the classifier needs one "
                                         r"output per class: pass --num-classes 10"):
        train_dynamicvit.check_num_classes(tiny, 10, "FMNIST", "vit_tiny_patch16_224", folders=False)


def test_a_checkpoint_with_another_class_count_names_the_shapes(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    three = train_dynamicvit.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32)
    save_file(three.state_dict(), str(tmp_path / "three.safetensors"))
    model = train_dynamicvit.create_model("vit_tiny_patch16_224", num_classes=2, img_size=32)
    with pytest.raises(SystemExit, match=r"head\.weight \(3, 192\) vs \(2, 192\).*classifies 3 classes, the model 2: pass --num-classes 3"):
        train_dynamicvit.load_weights(model, tmp_path / "three.safetensors", num_classes_option=True)
    # fmnist_pruning's and the project configurations' callers have no --num-classes to name
    with pytest.raises(SystemExit, match=r"classifies 3 classes, the model 2$"):
        train_dynamicvit.load_weights(model, tmp_path / "three.safetensors")

    # a DistributedDataParallel save, nested under 'model' with every key prefixed 'module.'
    two = train_dynamicvit.create_model("vit_tiny_patch16_224", num_classes=2, img_size=32)
    torch.save({"model": {f"module.{k}": v for k, v in two.state_dict().items()}}, tmp_path / "ddp.pth")
    train_dynamicvit.load_weights(model, tmp_path / "ddp.pth")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in two.state_dict().items())


def test_backbone_learning_rate_scale_is_applied_at_every_step(image_folder: Path, tmp_path: Path) -> None:
    """--backbone-lr-scale 0: the step moves the predictors but leaves every backbone weight
    exactly as initialised (AdamW's decay is scaled by the learning rate too)."""
    from safetensors.torch import load_file

    train_dynamicvit.main(["--data", str(image_folder), *COMMON, "--train-backbone", "--backbone-lr-scale", "0",
                           "--max-steps", "1", "--epochs", "1", "--out", str(tmp_path)])  # fmt: skip
    torch.manual_seed(0)  # the run's seed: the same initial weights, backbone then predictors
    backbone = train_dynamicvit.create_model("vit_tiny_patch16_224", num_classes=2, img_size=32)
    backbone_keys = set(backbone.state_dict())
    initial = tokenprune.patch(backbone, "dynamicvit").state_dict()
    trained = load_file(str(tmp_path / "model.safetensors"))
    predictor_keys = set(trained) - backbone_keys
    assert predictor_keys and trained.keys() == initial.keys()
    assert all(torch.equal(trained[k], initial[k]) for k in backbone_keys)
    assert not all(torch.equal(trained[k], initial[k]) for k in predictor_keys)


def test_logged_loss_is_the_mean_per_step_and_top1_a_percentage(image_folder: Path, tmp_path: Path, monkeypatch) -> None:
    losses: list[float] = []
    real_forward = train_dynamicvit.TrainStep.forward

    def forward(self, images, labels):
        terms = real_forward(self, images, labels)
        losses.append(float(terms["loss"].detach()))
        return terms

    monkeypatch.setattr(train_dynamicvit.TrainStep, "forward", forward)
    monkeypatch.setattr(train_dynamicvit, "evaluate", lambda *args: (3.0, 8))  # 3 of 8 right
    summary = train_dynamicvit.main(["--data", str(image_folder), *COMMON, "--method", "none", "--epochs", "1", "--out", str(tmp_path)])
    assert summary["steps"] == len(losses) == 2  # 8 images, batches of 4
    assert summary["train_loss"] == pytest.approx(sum(losses) / len(losses))
    assert summary["val_top1"] == 37.5


def test_the_run_trains_what_its_arguments_say(image_folder: Path, tmp_path: Path, monkeypatch) -> None:
    """The objective gets --keep-ratio and --label-smoothing, the teacher is the --checkpoint
    backbone (frozen), and the training loader shuffles."""
    from safetensors.torch import load_file

    made: list[tuple] = []
    real_init = train_dynamicvit.TrainStep.__init__

    def init(self, model, teacher, criterion):
        made.append((model, teacher, criterion))
        real_init(self, model, teacher, criterion)

    shuffles: list[bool | None] = []
    real_loader = train_dynamicvit.DataLoader

    def loader(*args, **kwargs):
        shuffles.append(kwargs.get("shuffle"))
        return real_loader(*args, **kwargs)

    monkeypatch.setattr(train_dynamicvit.TrainStep, "__init__", init)
    monkeypatch.setattr(train_dynamicvit, "DataLoader", loader)
    common = ["--data", str(image_folder), *COMMON, "--epochs", "1", "--max-steps", "1"]
    train_dynamicvit.main([*common, "--method", "none", "--label-smoothing", "0.3", "--out", str(tmp_path / "backbone")])
    checkpoint = tmp_path / "backbone" / "model.safetensors"
    train_dynamicvit.main([*common, "--checkpoint", str(checkpoint), "--keep-ratio", "0.5", "--label-smoothing", "0.2",
                           "--out", str(tmp_path / "dvit")])  # fmt: skip
    (_, none_teacher, ce), (_, teacher, loss) = made
    assert none_teacher is None and ce.label_smoothing == 0.3
    assert (loss.keep_ratio, loss.label_smoothing) == (0.5, 0.2)
    saved = load_file(str(checkpoint))
    assert teacher.state_dict().keys() == saved.keys()
    assert all(torch.equal(v, saved[k]) for k, v in teacher.state_dict().items())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert shuffles[0] is True and shuffles[2] is True  # each run's training loader (then its validation loader)


def test_epoch_seeds_differ_by_epoch_and_rank() -> None:
    """Each (epoch, rank) draws its own random numbers, the same ones again for a resumed run."""
    def draws(epoch: int, rank: int) -> tuple:
        train_dynamicvit.seed_epoch(0, epoch, rank)
        return (*torch.rand(2).tolist(), random.random())

    assert draws(1, 0) == draws(1, 0)
    assert len({draws(epoch, rank) for epoch in (0, 1, 2) for rank in (0, 1)}) == 6


def test_resume_takes_the_command_line_s_weight_decay_and_lr_scale(image_folder: Path, tmp_path: Path) -> None:
    """The docstring's promise: resuming, the command line's weight decay and backbone learning-rate
    scale win over the saved optimizer's."""
    args = ["--data", str(image_folder), *COMMON, "--train-backbone", "--max-steps", "1", "--out", str(tmp_path)]
    train_dynamicvit.main([*args, "--epochs", "1"])
    train_dynamicvit.main([*args, "--epochs", "2", "--resume", "--weight-decay", "0.2", "--backbone-lr-scale", "0.5"])
    groups = torch.load(tmp_path / "train_state.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [(g["weight_decay"], g["lr_scale"]) for g in groups] == [(0.2, 1.0), (0.0, 1.0), (0.2, 0.5), (0.0, 0.5)]


@pytest.mark.parametrize("train_backbone", [False, True])
def test_a_frozen_backbone_trains_in_eval_mode(image_folder: Path, tmp_path: Path, monkeypatch, train_backbone: bool) -> None:
    """Predictors alone: the frozen backbone runs as the fixed function it is (its dropout and
    drop-path off), the predictors in training mode (Gumbel masks); --train-backbone trains both."""
    seen: list[tuple[bool, bool, bool]] = []
    real_forward = train_dynamicvit.TrainStep.forward

    def forward(self, images, labels):
        seen.append((self.model.blocks[0].training, all(p.training for p in predictors(self.model).values()), self.teacher.training))
        return real_forward(self, images, labels)

    monkeypatch.setattr(train_dynamicvit.TrainStep, "forward", forward)
    extra = ["--train-backbone"] if train_backbone else []
    train_dynamicvit.main(["--data", str(image_folder), *COMMON, *extra, "--max-steps", "1", "--epochs", "1", "--out", str(tmp_path)])
    assert seen == [(train_backbone, True, False)]


def test_a_damaged_file_stops_with_its_name(image_folder: Path, tmp_path: Path) -> None:
    """A damaged train_state.pt, predictor file or --checkpoint stops the run naming the file, not with
    torch's or safetensors' words alone (an empty EOFError; advice to load with weights_only=False)."""
    run = tmp_path / "run"
    args = ["--data", str(image_folder), *COMMON, "--max-steps", "1", "--out", str(run)]
    train_dynamicvit.main([*args, "--epochs", "1"])
    state = run / "train_state.pt"
    intact = state.read_bytes()
    for damaged in (b"", intact[: len(intact) // 2], b"no checkpoint"):
        state.write_bytes(damaged)
        with pytest.raises(SystemExit, match=rf"--resume: {re.escape(str(state))} cannot be read: it is damaged"):
            train_dynamicvit.main([*args, "--epochs", "2", "--resume"])

    model = train_dynamicvit.create_model("vit_tiny_patch16_224", num_classes=2, img_size=32)
    half = tmp_path / "half.safetensors"
    half.write_bytes((run / "predictors.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"{re.escape(str(half))} is no readable safetensors file of predictor weights"):
        tokenprune.patch(model, "dynamicvit", predictor=str(half))
    model = train_dynamicvit.create_model("vit_tiny_patch16_224", num_classes=2, img_size=32)  # (a failed patch leaves none)
    with pytest.raises(SystemExit, match=rf"{re.escape(str(half))} is no readable safetensors file"):
        train_dynamicvit.load_weights(model, half)
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    for name, damaged in (("empty.pth", b""), ("half.pth", (tmp_path / "weights.pth").read_bytes()[:1000])):
        (tmp_path / name).write_bytes(damaged)
        with pytest.raises(SystemExit, match=rf"{re.escape(str(tmp_path / name))} cannot be read: it is damaged"):
            train_dynamicvit.load_weights(model, tmp_path / name)


def test_a_bad_keep_ratio_or_stages_stops_before_the_data_is_read(image_folder: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """An out-of-range --keep-ratio or --stages stops the run before the data set is scanned (an
    ImageNet folder takes minutes), named as patching would name it; valid ones still train."""
    scanned: list[bool] = []
    real_build = train_dynamicvit.build_datasets

    def build(args, model):
        scanned.append(True)
        return real_build(args, model)

    monkeypatch.setattr(train_dynamicvit, "build_datasets", build)
    base = ["--data", str(image_folder), *COMMON, "--epochs", "1", "--max-steps", "1"]
    with pytest.raises(SystemExit):
        train_dynamicvit.main([*base, "--keep-ratio", "1.5", "--out", str(tmp_path / "a")])
    assert re.search(r"keep_ratio must be in \(0, 1\], got 1\.5", capsys.readouterr().err)
    with pytest.raises(SystemExit, match=r"stages must be increasing block indices in \[1, 11\], got \(3, 12\).*12 blocks"):
        train_dynamicvit.main([*base, "--stages", "3", "12", "--out", str(tmp_path / "b")])
    assert scanned == [] and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    train_dynamicvit.main([*base, "--stages", "3", "11", "--keep-ratio", "0.5", "--out", str(tmp_path / "c")])
    assert scanned == [True] and (tmp_path / "c" / "predictors.safetensors").is_file()
