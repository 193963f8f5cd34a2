"""Train DynamicViT token predictors on a timm ViT (or, with ``--method none``, the ViT itself).

    # predictors for a pretrained backbone, on an ImageFolder data set, backbone frozen:
    python -m evals.train_dynamicvit --data /imagenet --model deit_small_patch16_224 --pretrained \\
        --keep-ratio 0.7 --epochs 30 --out runs/deit_s_dvit
    # multi-GPU: torchrun --nproc_per_node 8 -m evals.train_dynamicvit ...
    # Fashion-MNIST (offline): first the small ViT, then its predictors
    python -m evals.train_dynamicvit --dataset fashion_mnist --data /tmp/fmnist --model fmnist_vit \\
        --method none --epochs 15 --out runs/fmnist_vit
    python -m evals.train_dynamicvit --dataset fashion_mnist --data /tmp/fmnist --model fmnist_vit \\
        --checkpoint runs/fmnist_vit/model.safetensors --train-backbone --backbone-lr-scale 0.3 \\
        --epochs 8 --warmup-steps 100 --label-smoothing 0 --out runs/fmnist_dvit   # evals/checkpoints/README.md

DynamicViT (Sec. 3.5): the student is the backbone patched with prediction modules; the teacher
is the same backbone unpatched (frozen); the loss is :class:`DynamicViTLoss`. With
``--train-backbone`` the backbone trains too, at ``--backbone-lr-scale`` (0.01) of the predictors'
learning rate, as in DynamicViT's training recipe.

Each epoch writes, each file atomically and ``train_state.pt`` last: ``predictors.safetensors``,
``model.safetensors`` (the whole model, with ``--method none`` or ``--train-backbone``),
``train_state.pt`` (optimizer, loss scaler, epoch, the run's configuration, and a copy of the
trained weights, so that it alone marks an epoch complete and ``--resume`` reads everything from
it) and a line of ``train_log.jsonl``. A new run refuses an ``--out`` that holds one. Every epoch
draws its randomness (data order, augmentation, Gumbel noise) from seeds fixed by
``--seed``, the epoch and the rank, so ``--resume`` continues exactly as an uninterrupted run
would; it refuses a configuration that would train something else (another backbone, method,
stages, data set, ...). Load trained predictors with
``tokenprune.patch(model, "dynamicvit", predictor=PATH)``.

Under ``torchrun`` the gradients are averaged over the ranks, each of which takes the loss over its
own batch: that equals one process's loss over the whole batch, except for the token distillation,
the mean over each rank's kept tokens (as in DynamicViT's own multi-GPU training); the data order and
the Gumbel noise are drawn per rank, so a run does not repeat a one-process run's draws either.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import pickle
import random
import time
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

import tokenprune
from evals.distributed import Dist, ShardSampler, setup
from evals.harness import DTYPES, autocast, write_atomic
from evals.imagenet import load_checkpoint, read_checkpoint
from evals.metrics import topk_correct
from tokenprune.methods.dynamicvit import (
    DynamicViTLoss,
    forward_train,
    predictors,
    save_predictors,
)
from tokenprune.patch.vit import check_supported, reducing_model

# The small ViT the project trains on Fashion-MNIST: 28² grey images, 4×4 patches (49 tokens +
# class token), 6 blocks of width 96 — 0.7 M parameters, a 2.7 MB checkpoint.
MODELS: dict[str, dict[str, Any]] = {
    "fmnist_vit": {
        "model_name": "vit_tiny_patch16_224",
        "img_size": 28,
        "patch_size": 4,
        "in_chans": 1,
        "embed_dim": 96,
        "depth": 6,
        "num_heads": 3,
        "num_classes": 10,
    },
}

# The sub-folder names timm's ImageFolder accepts for each split (``_search_split``), in its order.
TRAIN_SPLITS = ("train", "training")
VAL_SPLITS = ("validation", "val", "valid", "eval", "evaluation")
FASHION_MNIST_CLASSES = 10

# What a resumed run must share with the run it continues: anything else trains another model.
# (Schedule and optimizer settings may change: a larger --epochs extends the cosine.)
RUN_IDENTITY = (
    "dataset", "model", "pretrained", "checkpoint", "num_classes", "img_size", "method", "keep_ratio", "stages",
    "train_backbone", "seed",
)  # fmt: skip


def create_model(
    name: str, pretrained: bool = False, num_classes: int | None = None, img_size: int | None = None
) -> nn.Module:
    """A timm model by name, or one of the project's own configurations (:data:`MODELS`)."""
    if name in MODELS:
        given = [flag for flag, value in (("pretrained", pretrained), ("num_classes", num_classes), ("img_size", img_size)) if value]
        if given:
            raise ValueError(f"{name} is a fixed configuration (no pretrained weights, its own size): drop {', '.join(given)}")
        kwargs = dict(MODELS[name])
        return timm.create_model(kwargs.pop("model_name"), pretrained=False, **kwargs)
    kwargs = {k: v for k, v in (("num_classes", num_classes), ("img_size", img_size)) if v is not None}
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def load_weights(model: nn.Module, path: str | Path, num_classes_option: bool = False) -> None:
    """Strictly load a safetensors or ``torch.save`` state dict (plain, under 'model'/'state_dict',
    or a DDP save's ``module.``-prefixed keys), as ``evals.imagenet`` loads its ``--checkpoint``:
    missing, unexpected and mis-shaped keys stop the run, named; ``num_classes_option``: the
    caller takes ``--num-classes``, which the error then names for a classifier of another size."""
    path = Path(path)
    load_checkpoint(model, read_checkpoint(path), path, num_classes_option)


def find_splits(root: Path) -> tuple[Path, Path]:
    """``root``'s training and validation folders. Without them timm would read ``root`` itself for
    both splits, and the run would validate on its training images: stop and say what is missing."""
    found = {
        kind: next((root / name for name in names if (root / name).is_dir()), None)
        for kind, names in (("training", TRAIN_SPLITS), ("validation", VAL_SPLITS))
    }
    missing = [
        f"{kind} folder ({' or '.join(name + '/' for name in names)})"
        for (kind, path), names in zip(found.items(), (TRAIN_SPLITS, VAL_SPLITS))
        if path is None
    ]
    if missing:
        raise SystemExit(
            f"--data {root} has no {' and no '.join(missing)}: lay it out as {root}/train/<class>/<image> "
            f"and {root}/validation/<class>/<image> (or {root}/val/...); for the Fashion-MNIST idx files pass "
            "--dataset fashion_mnist"
        )
    return found["training"], found["validation"]


def check_same_classes(train: Path, val: Path, train_classes: list[str], val_classes: list[str]) -> None:
    """Labels are indices into each split's sorted class folders: with other folders in each split,
    the same index would name another class in training than in validation."""
    if train_classes == val_classes:
        return
    only = [
        f"only in {folder}: {sorted(set(mine) - set(other))}"
        for folder, mine, other in ((train, train_classes, val_classes), (val, val_classes, train_classes))
        if set(mine) - set(other)
    ]
    raise SystemExit(
        f"the class folders differ between {train} and {val} ({'; '.join(only)}): labels are indices of the "
        "sorted folder names, so they would name other classes in each split. Give both splits the same class folders"
    )


def check_num_classes(model: nn.Module, data_classes: int, data: str, model_name: str, folders: bool = True) -> None:
    """Stop unless the model classifies exactly the data's classes.

    Unlike ``evals.imagenet`` (which only warns: evaluating on a subset of ImageNet's class
    folders is legitimate there, and it has ``--class-map``), a mismatch is an error here either
    way: with fewer model classes some labels are out of range; with more, the labels are indices
    of the sorted folder names and name the model's classes only if every class is present — a
    subset (say 100 ImageNet wnids) would train the pretrained classifier, or distil from the
    teacher, under wrong labels, silently. ``--num-classes`` builds a classifier of the data's size.
    """
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if num_classes == data_classes:
        return
    if model_name in MODELS:
        raise SystemExit(
            f"{data} has {data_classes} classes but {model_name} has {num_classes} classes, fixed: train a timm "
            f"--model with --num-classes {data_classes} (e.g. vit_tiny_patch16_224), or use data with {num_classes} classes"
        )
    why = "labels are indices of the sorted folder names, so the classifier needs one output per folder" if folders else (
        "the classifier needs one output per class")
    raise SystemExit(
        f"{data} has {data_classes} {'class folders' if folders else 'classes'} but the model has {num_classes} "
        f"classes: {why}: pass --num-classes {data_classes}"
    )


def build_datasets(args: argparse.Namespace, model: nn.Module) -> tuple[Dataset, Dataset]:
    """The training and validation sets, refused (see the checks above) unless they are two
    separate splits of the same classes, as many as the model's."""
    if args.dataset == "fashion_mnist":
        from evals.fashion_mnist import FashionMNIST

        check_num_classes(model, FASHION_MNIST_CLASSES, f"--dataset fashion_mnist ({args.data})", args.model, folders=False)
        return FashionMNIST(args.data, "train", augment=True), FashionMNIST(args.data, "test")
    train_root, val_root = find_splits(Path(args.data))
    # The folders found, not --data: timm's own search would fall back to --data itself.
    train = timm.data.create_dataset("", root=str(train_root), search_split=False, is_training=True)
    val = timm.data.create_dataset("", root=str(val_root), search_split=False)
    train_classes, val_classes = list(train.reader.class_to_idx), list(val.reader.class_to_idx)
    check_same_classes(train_root, val_root, train_classes, val_classes)
    check_num_classes(model, len(train_classes), str(train_root), args.model)
    # The model's own input size: its pretrained config may name another (e.g. --img-size).
    size = (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
    config = timm.data.resolve_data_config({"input_size": size}, model=model)
    train.transform = timm.data.create_transform(**config, is_training=True)
    val.transform = timm.data.create_transform(**config)
    return train, val


def steps_per_epoch(loader: DataLoader, max_steps: int | None, batch_size: int, world_size: int) -> int:
    """The training steps an epoch makes, refused if none: the loader drops the last, incomplete
    batch, so a training set smaller than one batch would train nothing, yet write a model."""
    if len(loader) == 0:
        images = len(loader.sampler)  # this process's share under DDP
        share = f" per process ({len(loader.dataset)} over {world_size} processes)" if world_size > 1 else ""
        raise SystemExit(f"{images} training images{share} < batch size {batch_size}: lower --batch-size")
    return len(loader) if max_steps is None else min(len(loader), max_steps)


def parameter_groups(model: nn.Module, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The optimizer's parameter groups, each with the ``lr_scale`` applied to the schedule.

    DynamicViT's recipe trains the prediction modules at the base learning rate and the
    backbone at 0.01× of it: the backbone only adapts to the sparser tokens, it must not
    forget what the teacher knows. Weight decay, as in DynamicViT's and DeiT's recipes (timm's
    ``param_groups_weight_decay``), applies to weight matrices alone: not to biases, norms and
    the model's ``no_weight_decay()`` tokens and embeddings (class token, position embedding).
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()

    def split(named: list[tuple[str, nn.Parameter]], lr_scale: float) -> list[dict[str, Any]]:
        no_decay = [p.ndim <= 1 or name in skip for name, p in named]
        return [
            {"params": params, "lr_scale": lr_scale, "weight_decay": weight_decay}
            for params, weight_decay in (
                ([p for (_, p), exempt in zip(named, no_decay) if not exempt], args.weight_decay),
                ([p for (_, p), exempt in zip(named, no_decay) if exempt], 0.0),
            )
            if params
        ]

    named = list(model.named_parameters())
    if args.method == "none":
        return split(named, 1.0)
    own = {id(p) for p in predictors(model).parameters()}
    groups = split([(name, p) for name, p in named if id(p) in own], 1.0)
    if args.train_backbone:
        groups += split([(name, p) for name, p in named if id(p) not in own], args.backbone_lr_scale)
    return groups


def cosine_lr(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class TrainStep(nn.Module):
    """One training step's forward, images and labels → loss terms (``"loss"`` the total).

    Everything with gradients happens inside this module's ``forward`` so that, wrapped in
    ``DistributedDataParallel``, its backward is synchronised across ranks. The teacher
    (DynamicViT's frozen, unpatched backbone; None to train the plain model with ``criterion``
    a cross-entropy) sits inside too: DDP starts every rank from rank 0's weights, teacher
    included.
    """

    def __init__(self, model: nn.Module, teacher: nn.Module | None, criterion: nn.Module) -> None:
        super().__init__()
        self.model, self.teacher, self.criterion = model, teacher, criterion

    def train(self, mode: bool = True) -> TrainStep:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher never trains: no dropout, no drop-path
        return self

    def forward(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        if self.teacher is None:
            return {"loss": self.criterion(self.model(images), labels)}
        with torch.no_grad():
            teacher_tokens = self.teacher.forward_features(images)
            teacher_logits = self.teacher.forward_head(teacher_tokens)
        output = forward_train(self.model, images)
        return self.criterion(output, labels, teacher_logits, teacher_tokens[:, self.model.num_prefix_tokens :])


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, dtype: torch.dtype, world: Dist) -> tuple[float, int]:
    """(correct, seen) top-1 over the loader, summed over ranks (each image on one rank); ties
    count as :func:`evals.metrics.topk_correct` counts them."""
    model.eval()
    correct, seen = 0.0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with autocast(device, dtype):
            logits = model(images)
        correct += topk_correct(logits, labels, (1,))[1]
        seen += len(labels)
    correct, seen = world.all_sum([correct, seen], device)
    return correct, seen


def check_ranks_agree(model: nn.Module, world: Dist) -> None:
    """Stop if the ranks' trainable weights differ: with gradients averaged by DDP they stay
    bit-identical, so a difference means a step ran outside the synchronised module."""
    if world.world_size == 1:
        return
    sums = [float(p.detach().double().sum()) for p in model.parameters() if p.requires_grad]
    if any(other != sums for other in world.gather(sums)):
        raise RuntimeError("the ranks' weights diverged: gradients were not synchronised across processes")


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed everything an epoch draws (data order, augmentation — timm's crops use Python's
    generator —, Gumbel noise, dropout) from (seed, epoch, rank) alone: a resumed run draws what
    an uninterrupted one would, and each rank draws its own."""
    epoch_seed = (seed * 1_000_003 + epoch) * 1_009 + rank
    torch.manual_seed(epoch_seed)  # CPU and every CUDA device
    random.seed(epoch_seed)


def trained_weights(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """What the run trains: the whole model (with its predictors, if any), or the predictors alone."""
    return model if args.method == "none" or args.train_backbone else predictors(model)


def save_checkpoint(out: Path, model: nn.Module, args: argparse.Namespace, state: dict[str, Any]) -> None:
    """The epoch's weights, then ``train_state.pt``, each atomically. ``train_state.pt`` holds a
    copy of the trained weights too, so that it alone marks the epoch complete: a run stopped
    between the two writes resumes from the previous epoch's state *and* weights."""
    if args.method == "none" or args.train_backbone:
        # the whole model (with its predictors, if any): load into a patched model
        from safetensors.torch import save

        write_atomic(out / "model.safetensors", save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}))
    if args.method == "dynamicvit":
        save_predictors(model, out / "predictors.safetensors")
    buffer = io.BytesIO()
    torch.save({**state, "weights": trained_weights(model, args).state_dict()}, buffer)
    write_atomic(out / "train_state.pt", buffer.getvalue())


def run_identity(args: argparse.Namespace) -> dict[str, Any]:
    identity = {key: getattr(args, key) for key in RUN_IDENTITY}
    if identity["checkpoint"] is not None:  # one file, however the path is spelled
        identity["checkpoint"] = str(Path(identity["checkpoint"]).resolve())
    return identity


def load_train_state(args: argparse.Namespace) -> dict[str, Any]:
    """``--out``'s last complete epoch, refused (before anything is built) if it trained another
    configuration than the command line's or has nothing left to train."""
    path = args.out / "train_state.pt"
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as error:  # torch's words name no file (or advise weights_only=False)
        raise SystemExit(
            f"--resume: {path} cannot be read: it is damaged, or no torch.save file ({type(error).__name__}); "
            "start afresh in another --out, or put back an intact copy"
        ) from None
    if not isinstance(saved, dict) or not {"identity", "optimizer", "scaler", "epoch", "weights"} <= saved.keys():
        raise SystemExit(f"--resume: {path} was written by an older version of this script; start afresh in another --out")
    given = run_identity(args)
    changed = {key: (saved["identity"].get(key, "<not saved>"), given[key]) for key in RUN_IDENTITY if saved["identity"].get(key, "<not saved>") != given[key]}
    if changed:
        raise SystemExit(
            f"--resume: {args.out} trained another configuration; (saved, given): {changed}. "
            "Pass the original arguments, or another --out to start afresh."
        )
    if saved["epoch"] + 1 >= args.epochs:
        raise SystemExit(f"--resume: {args.out} has trained {saved['epoch'] + 1} epochs already; pass a larger --epochs")
    return saved


def resume(
    saved: dict[str, Any], model: nn.Module, args: argparse.Namespace, optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> int:  # fmt: skip
    """Reload the saved epoch into ``model``, ``optimizer`` and ``scaler``; the next epoch. The
    command line's learning rates and weight decay win over the saved ones: the schedule is
    computed from them at every step. The weights come from the state itself (see
    :func:`save_checkpoint`); a frozen backbone from --checkpoint / --pretrained, as saved."""
    trained_weights(model, args).load_state_dict(saved["weights"])
    if len(saved["optimizer"]["param_groups"]) != len(optimizer.param_groups):  # before weight decay had its groups
        raise SystemExit(
            f"--resume: {args.out / 'train_state.pt'} was written by an older version of this script (its optimizer has "
            f"{len(saved['optimizer']['param_groups'])} parameter groups, this one {len(optimizer.param_groups)}); "
            "start afresh in another --out"
        )
    fresh = [(group["lr_scale"], group["weight_decay"]) for group in optimizer.param_groups]
    optimizer.load_state_dict(saved["optimizer"])
    for group, (lr_scale, weight_decay) in zip(optimizer.param_groups, fresh):
        group["lr_scale"], group["weight_decay"] = lr_scale, weight_decay
    if saved["scaler"]:  # empty when the saved run did not use float16
        scaler.load_state_dict(saved["scaler"])
    return saved["epoch"] + 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m evals.train_dynamicvit", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--data", required=True, help="ImageFolder root (train/ and validation/), or the Fashion-MNIST idx folder")
    add("--dataset", choices=["imagefolder", "fashion_mnist"], default="imagefolder")
    add("--model", required=True, help="timm model name or a project configuration: " + ", ".join(MODELS))
    add("--pretrained", action="store_true", help="timm pretrained weights (needs the network)")
    add("--checkpoint", help="backbone weights to start from (safetensors or torch.save)")
    add("--num-classes", type=int, help="classifier size for a timm model (default: the model's)")
    add("--img-size", type=int, help="input size for a timm model (default: the model's)")
    add("--method", choices=["dynamicvit", "none"], default="dynamicvit", help="none: train the plain model")
    add("--keep-ratio", type=float, default=0.7)
    add("--stages", type=int, nargs="+", help="blocks before which predictors run (default: DeiT's 3, 6, 9 scaled)")
    add("--train-backbone", action="store_true", help="also fine-tune the backbone (DynamicViT trains all)")
    add("--backbone-lr-scale", type=float, default=0.01,
        help="with --train-backbone: the backbone's learning rate as a fraction of --lr (DynamicViT: 0.01)")
    add("--epochs", type=int, default=30)
    add("--batch-size", type=int, default=128, help="per process")
    add("--lr", type=float, default=1e-3)
    add("--weight-decay", type=float, default=0.05, help="AdamW's, on weight matrices (not biases, norms, class token, position embedding)")
    add("--warmup-steps", type=int, default=200)
    add("--label-smoothing", type=float, default=0.1, help="on the cross-entropy term (both methods)")
    add("--dtype", choices=sorted(DTYPES), default="float32", help="autocast dtype (AMP; float16 with loss scaling)")
    add("--device", help="torch device (default: cuda if available — cuda:LOCAL_RANK under torchrun — else cpu)")
    add("--workers", type=int, default=2)
    add("--max-steps", type=int, help="stop each epoch after this many steps, ≥ 1 (smoke tests)")
    add("--seed", type=int, default=0)
    add("--out", type=Path, required=True)
    add("--resume", action="store_true", help="continue from OUT/train_state.pt (same model, method and stages)")
    args = parser.parse_args(argv)
    if not args.backbone_lr_scale >= 0:
        parser.error(f"--backbone-lr-scale must be ≥ 0, got {args.backbone_lr_scale}")
    if args.max_steps is not None and args.max_steps < 1:  # 0 would train nothing yet write a model
        parser.error(f"--max-steps must be ≥ 1, got {args.max_steps} (leave it out for whole epochs)")
    if args.stages is not None:
        args.stages = tuple(args.stages)
    if args.method == "dynamicvit":  # up front: patching refuses these too, but only after the data is scanned
        try:
            tokenprune.DynamicViTConfig(keep_ratio=args.keep_ratio, stages=args.stages)
        except (TypeError, ValueError) as error:
            parser.error(f"--keep-ratio/--stages: {error}")
    if args.epochs < 1:
        parser.error(f"--epochs must be ≥ 1, got {args.epochs}")
    if args.resume and not (args.out / "train_state.pt").is_file():
        parser.error(f"--resume: no {args.out / 'train_state.pt'} (drop --resume to start a new run there)")
    if not args.resume and (args.out / "train_state.pt").is_file():  # its checkpoint and log would mix with this run's
        parser.error(f"--out {args.out} holds a run already (train_state.pt): add --resume to continue it, or give another --out")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    saved = load_train_state(args) if args.resume else None
    device, world = setup(args.device)
    dtype = DTYPES[args.dtype]

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = create_model(args.model, args.pretrained, args.num_classes, args.img_size).to(device)
    if args.method == "dynamicvit":  # what patching would refuse (the stages' range needs the depth), before the data
        inner = reducing_model(model)
        check_supported(inner)
        depth = len(inner.blocks)
        try:
            tokenprune.DynamicViTConfig(keep_ratio=args.keep_ratio, stages=args.stages).stage_blocks(depth)
        except ValueError as error:
            raise SystemExit(f"--stages: {error} ({args.model} has {depth} blocks)") from None
    # The data first: its checks (splits, class count) stop a run before a checkpoint is read.
    train_set, val_set = build_datasets(args, model)
    if args.checkpoint:
        load_weights(model, args.checkpoint, num_classes_option=args.model not in MODELS)
    teacher = None
    if args.method == "dynamicvit":
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        tokenprune.patch(model, "dynamicvit", keep_ratio=args.keep_ratio, stages=args.stages)
        model.requires_grad_(args.train_backbone)
        predictors(model).requires_grad_(True)
    if teacher is None:
        criterion: nn.Module = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    else:
        criterion = DynamicViTLoss(args.keep_ratio, label_smoothing=args.label_smoothing)
    step_module: nn.Module = TrainStep(model, teacher, criterion)
    if world.world_size > 1:
        step_module = nn.parallel.DistributedDataParallel(step_module, device_ids=[device.index] if device.type == "cuda" else None)

    train_sampler = DistributedSampler(train_set, world.world_size, world.rank, seed=args.seed) if world.world_size > 1 else None
    # Workers start afresh each epoch (not persistent): their seeds then come from the epoch's.
    train_loader = DataLoader(
        train_set, args.batch_size, shuffle=train_sampler is None, sampler=train_sampler,
        num_workers=args.workers, drop_last=True,
    )  # fmt: skip
    val_loader = DataLoader(val_set, 256, sampler=ShardSampler(len(val_set), world.rank, world.world_size), num_workers=args.workers)
    epoch_steps = steps_per_epoch(train_loader, args.max_steps, args.batch_size, world.world_size)
    total_steps = args.epochs * epoch_steps

    optimizer = torch.optim.AdamW(parameter_groups(model, args), lr=args.lr, weight_decay=args.weight_decay)
    # float16 gradients underflow without loss scaling; bfloat16 and float32 need none.
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    args.out.mkdir(parents=True, exist_ok=True)
    start_epoch = resume(saved, model, args, optimizer, scaler) if saved else 0
    step = start_epoch * epoch_steps  # the schedule's position, even if the batch size or world changed

    summary: dict[str, Any] = {}
    for epoch in range(start_epoch, args.epochs):
        seed_epoch(args.seed, epoch, world.rank)
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)
        model.train()
        if args.method == "dynamicvit" and not args.train_backbone:
            model.eval()  # frozen backbone: no dropout/drop-path; the predictors train
            predictors(model).train()
        started, totals = time.perf_counter(), {}
        bar = tqdm(train_loader, total=epoch_steps, desc=f"epoch {epoch}", disable=not world.lead)
        for i, (images, labels) in enumerate(bar):
            if i == epoch_steps:
                break
            images, labels = images.to(device), labels.to(device)
            for group in optimizer.param_groups:
                group["lr"] = group["lr_scale"] * cosine_lr(step, total_steps, args.warmup_steps, args.lr)
            with autocast(device, dtype):
                terms = step_module(images, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(terms["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            for name, value in terms.items():
                totals[name] = totals.get(name, 0.0) + float(value.detach())
            bar.set_postfix(loss=f"{float(terms['loss'].detach()):.3f}")
        correct, seen = evaluate(model, val_loader, device, dtype, world)
        summary = {
            "epoch": epoch,
            "steps": step,
            **{f"train_{k}": v / epoch_steps for k, v in totals.items()},  # rank 0's batches
            "val_top1": 100.0 * correct / seen,
            "val_images": seen,
            "epoch_s": time.perf_counter() - started,
        }
        check_ranks_agree(model, world)
        if world.lead:
            state = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch, "identity": run_identity(args)}
            save_checkpoint(args.out, model, args, state)
            with open(args.out / "train_log.jsonl", "a") as log:
                log.write(json.dumps({**summary, "args": {k: str(v) for k, v in vars(args).items()}}) + "\n")
            print(json.dumps(summary))
    world.close()
    return summary


def cli() -> None:
    """The console script: ``main`` returns its results to Python callers, which
    ``sys.exit`` would print and turn into exit status 1."""
    main()


if __name__ == "__main__":
    cli()
