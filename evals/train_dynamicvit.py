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
        --epochs 8 --warmup-steps 100 --out runs/fmnist_dvit   # evals/checkpoints/README.md

DynamicViT (Sec. 3.5): the student is the backbone patched with prediction modules; the teacher
is the same backbone unpatched (frozen); the loss is :class:`DynamicViTLoss`. With
``--train-backbone`` the backbone trains too, at ``--backbone-lr-scale`` (0.01) of the predictors'
learning rate, as in DynamicViT's training recipe. Each epoch writes
``predictors.safetensors``, ``model.safetensors`` (the whole model, with ``--method none`` or
``--train-backbone``), ``train_state.pt``
(optimizer, schedule, epoch: ``--resume``) and a line of ``train_log.jsonl``. Load trained
predictors with ``tokenprune.patch(model, "dynamicvit", predictor=PATH)``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

import tokenprune
from evals.harness import DTYPES, autocast
from tokenprune.methods.dynamicvit import (
    DynamicViTLoss,
    forward_train,
    predictors,
    save_predictors,
)

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


def create_model(
    name: str, pretrained: bool = False, num_classes: int | None = None, img_size: int | None = None
) -> nn.Module:
    """A timm model by name, or one of the project's own configurations (:data:`MODELS`)."""
    if name in MODELS:
        kwargs = dict(MODELS[name])
        return timm.create_model(kwargs.pop("model_name"), pretrained=False, **kwargs)
    kwargs = {k: v for k, v in (("num_classes", num_classes), ("img_size", img_size)) if v is not None}
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Strictly load a safetensors or ``torch.save`` state dict (plain, or under 'model'/'state_dict')."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state.get("state_dict", state))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the model: missing {missing}, unexpected {unexpected}")


def build_datasets(args: argparse.Namespace, model: nn.Module) -> tuple[Dataset, Dataset]:
    if args.dataset == "fashion_mnist":
        from evals.fashion_mnist import FashionMNIST

        return FashionMNIST(args.data, "train", augment=True), FashionMNIST(args.data, "test")
    # The model's own input size: its pretrained config may name another (e.g. --img-size).
    size = (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
    config = timm.data.resolve_data_config({"input_size": size}, model=model)
    train = timm.data.create_dataset("", root=args.data, split="train", is_training=True)
    val = timm.data.create_dataset("", root=args.data, split="validation")
    train.transform = timm.data.create_transform(**config, is_training=True)
    val.transform = timm.data.create_transform(**config)
    return train, val


def parameter_groups(model: nn.Module, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The optimizer's parameter groups, each with the ``lr_scale`` applied to the schedule.

    DynamicViT's recipe trains the prediction modules at the base learning rate and the
    backbone at 0.01× of it: the backbone only adapts to the sparser tokens, it must not
    forget what the teacher knows.
    """
    if args.method == "none":
        return [{"params": list(model.parameters()), "lr_scale": 1.0}]
    predictor_params = list(predictors(model).parameters())
    groups = [{"params": predictor_params, "lr_scale": 1.0}]
    if args.train_backbone:
        own = {id(p) for p in predictor_params}
        backbone = [p for p in model.parameters() if id(p) not in own]
        groups.append({"params": backbone, "lr_scale": args.backbone_lr_scale})
    return groups


def cosine_lr(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, dtype: torch.dtype) -> tuple[int, int]:
    """(correct, seen) top-1 over the loader, summed over processes."""
    model.eval()
    correct = seen = 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with autocast(device, dtype):
            logits = model(images)
        correct += int((logits.argmax(-1) == labels).sum())
        seen += len(labels)
    if dist.is_initialized():
        counts = torch.tensor([correct, seen], device=device)
        dist.all_reduce(counts)
        correct, seen = counts.tolist()
    return correct, seen


def main(argv: list[str] | None = None) -> dict[str, Any]:
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
    add("--batch-size", type=int, default=128)
    add("--lr", type=float, default=1e-3)
    add("--weight-decay", type=float, default=0.05)
    add("--warmup-steps", type=int, default=200)
    add("--label-smoothing", type=float, default=0.1)
    add("--dtype", choices=sorted(DTYPES), default="float32", help="autocast dtype (AMP)")
    add("--workers", type=int, default=2)
    add("--max-steps", type=int, help="stop each epoch after this many steps (smoke tests)")
    add("--seed", type=int, default=0)
    add("--out", type=Path, required=True)
    add("--resume", action="store_true", help="continue from OUT/train_state.pt")
    args = parser.parse_args(argv)
    if not args.backbone_lr_scale >= 0:
        parser.error(f"--backbone-lr-scale must be ≥ 0, got {args.backbone_lr_scale}")

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if distributed else 0
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed + rank)

    model = create_model(args.model, args.pretrained, args.num_classes, args.img_size).to(device)
    if args.checkpoint:
        load_weights(model, args.checkpoint)
    teacher = None
    if args.method == "dynamicvit":
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        tokenprune.patch(model, "dynamicvit", keep_ratio=args.keep_ratio, stages=tuple(args.stages) if args.stages else None)
        model.requires_grad_(args.train_backbone)
        predictors(model).requires_grad_(True)
    param_groups = parameter_groups(model, args)
    criterion = DynamicViTLoss(args.keep_ratio)

    train_set, val_set = build_datasets(args, model)
    train_sampler = DistributedSampler(train_set, seed=args.seed) if distributed else None
    val_sampler = DistributedSampler(val_set, shuffle=False, drop_last=False) if distributed else None
    train_loader = DataLoader(
        train_set, args.batch_size, shuffle=train_sampler is None, sampler=train_sampler,
        num_workers=args.workers, drop_last=True, persistent_workers=args.workers > 0,
    )
    val_loader = DataLoader(val_set, 256, sampler=val_sampler, num_workers=args.workers)
    steps_per_epoch = min(len(train_loader), args.max_steps or len(train_loader))
    total_steps = args.epochs * steps_per_epoch

    runner: nn.Module = model
    if distributed:
        runner = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, weight_decay=args.weight_decay)
    args.out.mkdir(parents=True, exist_ok=True)
    start_epoch, step = 0, 0
    state_path = args.out / "train_state.pt"
    if args.resume and state_path.is_file():
        saved = torch.load(state_path, map_location=device, weights_only=True)
        if args.method == "none" or args.train_backbone:
            load_weights(model, args.out / "model.safetensors")
        else:
            tokenprune.patch(model, predictor=str(args.out / "predictors.safetensors"))
        optimizer.load_state_dict(saved["optimizer"])
        start_epoch, step = saved["epoch"] + 1, saved["step"]

    summary: dict[str, Any] = {}
    for epoch in range(start_epoch, args.epochs):
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)
        model.train()
        if args.method == "dynamicvit" and not args.train_backbone:
            model.eval()  # frozen backbone: no dropout/drop-path; the predictors train
            predictors(model).train()
        started, totals = time.perf_counter(), {}
        bar = tqdm(train_loader, total=steps_per_epoch, desc=f"epoch {epoch}", disable=rank != 0)
        for i, (images, labels) in enumerate(bar):
            if i == steps_per_epoch:
                break
            images, labels = images.to(device), labels.to(device)
            for group in optimizer.param_groups:
                group["lr"] = group["lr_scale"] * cosine_lr(step, total_steps, args.warmup_steps, args.lr)
            with autocast(device, dtype):
                if teacher is None:
                    terms = {"loss": F.cross_entropy(runner(images), labels, label_smoothing=args.label_smoothing)}
                else:
                    with torch.no_grad():
                        teacher_tokens = teacher.forward_features(images)
                        teacher_logits = teacher.forward_head(teacher_tokens)
                    output = forward_train(model, images)
                    terms = criterion(output, labels, teacher_logits, teacher_tokens[:, model.num_prefix_tokens :])
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
            step += 1
            for name, value in terms.items():
                totals[name] = totals.get(name, 0.0) + float(value.detach())
            bar.set_postfix(loss=f"{float(terms['loss'].detach()):.3f}")
        correct, seen = evaluate(model, val_loader, device, dtype)
        summary = {
            "epoch": epoch,
            "steps": step,
            **{f"train_{k}": v / steps_per_epoch for k, v in totals.items()},
            "val_top1": 100.0 * correct / seen,
            "val_images": seen,
            "epoch_s": time.perf_counter() - started,
        }
        if rank == 0:
            if args.method == "none" or args.train_backbone:
                # the whole model (with its predictors, if any): load into a patched model
                from safetensors.torch import save_file

                save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(args.out / "model.safetensors"))
            if args.method == "dynamicvit":
                save_predictors(model, args.out / "predictors.safetensors")
            torch.save({"optimizer": optimizer.state_dict(), "epoch": epoch, "step": step}, state_path)
            with open(args.out / "train_log.jsonl", "a") as log:
                log.write(json.dumps({**summary, "args": {k: str(v) for k, v in vars(args).items()}}) + "\n")
            print(json.dumps(summary))
    if distributed:
        dist.destroy_process_group()
    return summary


def cli() -> None:
    """The console script: ``main`` returns its results to Python callers, which
    ``sys.exit`` would print and turn into exit status 1."""
    main()


if __name__ == "__main__":
    cli()
