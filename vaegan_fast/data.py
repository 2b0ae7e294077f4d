"""Datasets: Fashion-MNIST from Debian's package, any folder of same-sized PNGs, and synthetic images.

Everything is read from disk; nothing is ever downloaded. Images come out as float32 [N, C*H*W] in [0, 1]
(each row an image in channel-first order, so ``row.reshape(C, H, W)`` is the image) with their shape
``(C, H, W)`` beside them: the shape goes from the files to the model, the sample grids and the checkpoint.
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
    images: torch.Tensor  # float32 [N, C*H*W] in [0, 1], channel-first within a row
    image_shape: tuple  # (C, H, W): C is 1 for grayscale, 3 for colour
    labels: Optional[torch.Tensor] = None  # int64 [N] where the data has them
    name: str = ""

    def __post_init__(self):
        shape = tuple(self.image_shape)
        if len(shape) != 3 or not all(isinstance(n, int) and n > 0 for n in shape):
            raise ValueError(f"image_shape must be (channels, height, width) of positive ints, got {self.image_shape!r}")
        if self.images.dim() != 2 or self.images.shape[1] != shape[0] * shape[1] * shape[2]:
            raise ValueError(f"images must be [N, {shape[0] * shape[1] * shape[2]}] rows of {'x'.join(map(str, shape))} "
                             f"images, got {list(self.images.shape)}")
        self.image_shape = shape

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
    return ImageDataset(pixels, (1, 28, 28), torch.from_numpy(labels.astype(np.int64)), f"fashion-mnist/{split}")


# ---------------------------------------------------------------------------------------------- PNG folders
IMAGE_SUFFIXES = (".png",)
# PIL modes whose pixels are one grey level (the rest are colour: RGB, RGBA, P, CMYK, ...); alpha is dropped.
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def _kind(image) -> int:
    """1 for a grayscale image file, 3 for a colour one (a palette image counts as grey only if its palette is)."""
    if image.mode == "P":
        palette = image.getpalette() or []
        grey = all(palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette) - 2, 3))
        return 1 if grey else 3
    return 1 if image.mode in _GREY_MODES else 3


def _pixels(image, channels: int, height: int, width: int) -> np.ndarray:
    """One image file as float32 [channels * height * width] in [0, 1], channel-first."""
    from PIL import Image

    if image.mode.startswith("I"):  # 16- or 32-bit grey levels: scale by the format's range, not clip at 255
        peak = 65535.0 if image.mode.startswith("I;16") or np.asarray(image).max() <= 65535 else 2.0**32 - 1
        grey = Image.fromarray(np.asarray(image, dtype=np.float32) / np.float32(peak), mode="F")
        image = grey
    if image.mode == "F":
        if (image.height, image.width) != (height, width):
            image = image.resize((width, height), Image.LANCZOS)
        arr = np.clip(np.asarray(image, dtype=np.float32), 0, 1)[None]
        return np.repeat(arr, channels, axis=0).reshape(-1)
    image = image.convert("L" if channels == 1 else "RGB")  # drops alpha; a palette maps to its colours
    if (image.height, image.width) != (height, width):
        image = image.resize((width, height), Image.LANCZOS)
    arr = np.asarray(image, dtype=np.uint8).reshape(height, width, channels).transpose(2, 0, 1)
    return (arr.astype(np.float32) / 255.0).reshape(-1)


def load_image_folder(folder: str | os.PathLike, channels: Optional[int] = None,
                      image_size: Optional[tuple] = None) -> ImageDataset:
    """Every *.png in ``folder`` (sorted by name) as one dataset of shape (C, H, W).

    By default the files decide: all grayscale gives C = 1, all colour C = 3, and every file must have the
    same size; a folder that mixes them is refused with an error naming one file of each kind.
    ``channels`` (1 or 3) converts every file to grayscale or RGB, and ``image_size`` ((H, W)) resizes every
    file (Lanczos), so a mixed folder can be used on purpose.
    """
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if image_size is not None:
        if (len(image_size) != 2 or any(not isinstance(v, int) or isinstance(v, bool) or v <= 0
                                        for v in image_size)):
            raise ValueError(f"image_size must be (height, width) in positive pixels, got {image_size!r}")
        image_size = tuple(image_size)
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise ValueError(f"image folder {folder} holds no .png files")
    opened = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                opened.append((f, im.copy()))
        except Exception as exc:
            raise ValueError(f"{f} is not a readable PNG image: {exc}") from exc
    if channels is None:
        kinds = {}
        for f, im in opened:
            kinds.setdefault(_kind(im), f)
        if len(kinds) > 1:
            raise ValueError(f"image folder {folder} mixes grayscale images ({kinds[1].name}) and colour images "
                             f"({kinds[3].name}): pass --channels 1 or --channels 3 to convert them all")
        channels = next(iter(kinds))
    if image_size is None:
        sizes = {}
        for f, im in opened:
            sizes.setdefault((im.height, im.width), f)
        if len(sizes) > 1:
            (first, a), (second, b) = list(sizes.items())[:2]
            raise ValueError(f"image folder {folder} mixes image sizes: {a.name} is {first[1]}x{first[0]} and "
                             f"{b.name} is {second[1]}x{second[0]} (width x height); all images must be the "
                             "same size, or pass --image-size HxW to resize them all")
        image_size = next(iter(sizes))
    height, width = image_size
    arrays = [_pixels(im, channels, height, width) for _, im in opened]
    pixels = torch.from_numpy(np.stack(arrays))
    return ImageDataset(pixels, (channels, height, width), None, f"folder:{folder}")


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
    return ImageDataset(images.clamp(0, 1).reshape(n, side * side), (1, side, side), None, "synthetic")


def load_dataset(name: str, split: str = "train", channels: Optional[int] = None,
                 image_size: Optional[tuple] = None) -> ImageDataset:
    """"fashion-mnist", "synthetic", or the path of a folder of PNG images (``channels`` and ``image_size``
    convert a folder's images; see load_image_folder)."""
    if name in DATASETS:
        if channels is not None or image_size is not None:
            raise ValueError(f"channels and image_size convert the images of a folder; {name!r} has a fixed shape")
        return load_fashion_mnist(split) if name == "fashion-mnist" else synthetic(seed=0 if split == "train" else 1)
    if Path(name).is_dir():
        return load_image_folder(name, channels=channels, image_size=image_size)
    if Path(name).exists():
        raise ValueError(f"data {name!r} is a file; give a folder of PNG images, or one of {DATASETS}")
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
