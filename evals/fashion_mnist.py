"""Fashion-MNIST (Xiao et al. 2017; MIT) as a torch Dataset, read from the idx files that
Debian's ``dataset-fashion-mnist`` package ships: the one sizeable real labelled data set that
works offline here. 60,000 training and 10,000 test images, 28×28 grey, 10 classes.

Get the files without installing the package (about 30 MB)::

    apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb /tmp/fmnist
    # → /tmp/fmnist/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MEAN, STD = 0.2860, 0.3530  # of the training images, for normalisation
DEBIAN_PATH = "usr/share/datasets/fashion-mnist"


def find_root(path: str | Path) -> Path:
    """The folder holding the idx files: ``path`` itself, or Debian's layout below it."""
    path = Path(path)
    for candidate in (path, path / DEBIAN_PATH):
        if (candidate / "t10k-images-idx3-ubyte.gz").is_file():
            return candidate
    raise FileNotFoundError(f"no Fashion-MNIST idx files under {path}; see evals/fashion_mnist.py for how to get them")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (MNIST's format: 0, 0, type 0x08, the number of dimensions,
    then each dimension as a big-endian int32, then the data), gzipped."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (header {data[:4].hex()}, expected 000008xx)")
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    expected = 4 + 4 * dims + int(np.prod(shape))
    if len(data) != expected:
        raise ValueError(f"{path}: {len(data)} bytes where its header {shape} says {expected}: truncated or corrupt")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


class FashionMNIST(Dataset):
    """Images as [1, 28, 28] float tensors, normalised; with ``augment``, random 2-pixel shifts
    and horizontal flips (training)."""

    def __init__(self, root: str | Path, split: str = "train", augment: bool = False) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        root = find_root(root)
        prefix = "train" if split == "train" else "t10k"
        missing = [name for name in (f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz") if not (root / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{root} has no {' or '.join(missing)} for the {split} split; see evals/fashion_mnist.py for how to get them")
        self.images = torch.from_numpy(read_idx(root / f"{prefix}-images-idx3-ubyte.gz").copy())
        self.labels = torch.from_numpy(read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64))
        if len(self.images) != len(self.labels):
            raise ValueError(f"{root}: {len(self.images)} {split} images but {len(self.labels)} labels")
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = (self.images[index].float() / 255.0 - MEAN) / STD
        image = image[None]
        if self.augment:
            padded = torch.nn.functional.pad(image, (2, 2, 2, 2), value=-MEAN / STD)
            top, left = torch.randint(0, 5, (2,)).tolist()
            image = padded[:, top : top + 28, left : left + 28]
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
        return image, int(self.labels[index])
