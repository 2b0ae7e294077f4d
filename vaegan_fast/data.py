"""Datasets: Fashion-MNIST from Debian's package, any folder of same-sized PNGs, and synthetic images.

Everything is read from disk; nothing is ever downloaded. Images come out as float32 [N, H*W*C] in [0, 1].
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

FASHION_MNIST_DIR = Path(os.environ.get("VAEGAN_FAST_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_INSTALL = "apt-get update && apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
                       "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000)}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
DATASETS = ("fashion-mnist", "synthetic")  # or a path to a folder of PNGs


@dataclass
class ImageDataset:
    images: torch.Tensor  # float32 [N, H*W*C] in [0, 1]
    image_shape: tuple  # (H, W) for grayscale, (H, W, C) for colour
    labels: Optional[torch.Tensor] = None  # int64 [N] where the data has them
    name: str = ""

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def dim(self) -> int:
        return self.images.shape[1]


# ---------------------------------------------------------------------------------------------- IDX files
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed), checking its header against its length."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"{path} is corrupt or truncated: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path} is truncated: its header needs {header} bytes, the file has {len(raw)}")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path} is truncated or corrupt: header says shape {shape} ({expected} bytes), "
                         f"file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> ImageDataset:
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be one of {tuple(FASHION_MNIST_FILES)}, got {split!r}")
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    image_file, label_file, count = FASHION_MNIST_FILES[split]
    if not (root / image_file).is_file() or not (root / label_file).is_file():
        raise FileNotFoundError(f"Fashion-MNIST is not installed in {root}: install it with "
                                f"`{FASHION_MNIST_INSTALL}` (or set VAEGAN_FAST_FASHION_MNIST to its folder)")
    images, labels = read_idx(root / image_file), read_idx(root / label_file)
    if images.shape != (count, 28, 28) or labels.shape != (count,):
        raise ValueError(f"Fashion-MNIST {split} files in {root} have shapes {images.shape} and {labels.shape}, "
                         f"expected ({count}, 28, 28) and ({count},)")
    if labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"Fashion-MNIST {split} labels in {root} are out of range: corrupt file")
    pixels = torch.from_numpy(images.reshape(count, 784).astype(np.float32) / 255.0)
    return ImageDataset(pixels, (28, 28), torch.from_numpy(labels.astype(np.int64)), f"fashion-mnist/{split}")


# ---------------------------------------------------------------------------------------------- PNG folders
def load_image_folder(folder: str | os.PathLike, mode: str = "L") -> ImageDataset:
    """Every *.png in ``folder`` (sorted by name), all of one size, as grayscale ("L") or colour ("RGB")."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    if mode not in ("L", "RGB"):
        raise ValueError(f"mode must be 'L' or 'RGB', got {mode!r}")
    files = sorted(folder.glob("*.png"))
    if not files:
        raise ValueError(f"image folder {folder} holds no .png files")
    arrays, size = [], None
    for f in files:
        try:
            with Image.open(f) as im:
                arr = np.asarray(im.convert(mode))
        except Exception as exc:
            raise ValueError(f"{f} is not a readable PNG image: {exc}") from exc
        if size is None:
            size = arr.shape
        elif arr.shape != size:
            raise ValueError(f"{f} has size {arr.shape[1]}x{arr.shape[0]} but {files[0].name} has "
                             f"{size[1]}x{size[0]}: all images must be the same size")
        arrays.append(arr.reshape(-1))
    pixels = torch.from_numpy(np.stack(arrays).astype(np.float32) / 255.0)
    return ImageDataset(pixels, tuple(size), None, f"folder:{folder}")


# ---------------------------------------------------------------------------------------------- synthetic
def synthetic(n: int = 8192, side: int = 28, seed: int = 0) -> ImageDataset:
    """Images of one to three soft blobs at random places: structured, not noise, and free to make."""
    gen = torch.Generator().manual_seed(seed)
    coords = torch.linspace(0, 1, side)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    images = torch.zeros(n, side, side)
    for _ in range(3):
        present = (torch.rand(n, 1, 1, generator=gen) < 0.7).float()
        cy, cx = torch.rand(2, n, 1, 1, generator=gen) * 0.8 + 0.1
        width = torch.rand(n, 1, 1, generator=gen) * 0.12 + 0.04
        images += present * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2))
    return ImageDataset(images.clamp(0, 1).reshape(n, side * side), (side, side), None, "synthetic")


def load_dataset(name: str, split: str = "train", **kwargs) -> ImageDataset:
    """"fashion-mnist", "synthetic", or the path of a folder of PNG images."""
    if name == "fashion-mnist":
        return load_fashion_mnist(split, **kwargs)
    if name == "synthetic":
        return synthetic(seed=0 if split == "train" else 1, **kwargs)
    if Path(name).is_dir():
        return load_image_folder(name, **kwargs)
    raise ValueError(f"data must be one of {DATASETS} or a folder of PNG images, got {name!r}")


# ---------------------------------------------------------------------------------------------- batches
class BatchStream:
    """Shuffled batches as a pure function of the step number, so a resumed run sees the same batches.

    Each epoch is a fresh permutation drawn from (seed, epoch); the last partial batch of an epoch is
    dropped so every step has ``batch_size`` rows.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, seed: int = 0, device="cpu"):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if batch_size > len(dataset):
            raise ValueError(f"batch_size {batch_size} is larger than the dataset ({len(dataset)} images)")
        self.images = dataset.images.to(device)
        self.batch_size, self.seed = batch_size, seed
        self.steps_per_epoch = len(dataset) // batch_size
        self._epoch, self._perm = -1, None

    def rows(self, step: int) -> torch.Tensor:
        """The dataset rows of step ``step``'s batch."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.images.shape[0], generator=gen).to(self.images.device)
            self._epoch = epoch
        return self._perm[index * self.batch_size:(index + 1) * self.batch_size]

    def batch(self, step: int) -> torch.Tensor:
        return self.images.index_select(0, self.rows(step))
