"""Image grids as PNG files (through Pillow)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch


def save_grid(images: torch.Tensor, image_shape: tuple, path: str | os.PathLike, columns: int | None = None,
              pad: int = 2, scale: int = 2) -> Path:
    """Tile ``images`` (flat rows [n, C*H*W] or [n, C, H, W], in [0, 1]) of ``image_shape`` (C, H, W) into
    one PNG, ``columns`` per row: grayscale for C = 1, RGB for C = 3."""
    from PIL import Image

    if len(image_shape) != 3 or image_shape[0] not in (1, 3):
        raise ValueError(f"image_shape must be (C, H, W) with C 1 or 3, got {tuple(image_shape)}")
    channels, h, w = image_shape
    n = images.shape[0]
    if n == 0:
        raise ValueError("save_grid needs at least one image")
    if images[0].numel() != channels * h * w:
        raise ValueError(f"images hold {images[0].numel()} values each, image_shape {tuple(image_shape)} needs "
                         f"{channels * h * w}")
    columns = min(columns or math.ceil(math.sqrt(n)), n)
    rows = math.ceil(n / columns)
    pixels = images.detach().float().clamp(0, 1).cpu().reshape(n, channels, h, w).permute(0, 2, 3, 1).numpy()
    grid = np.ones(((h + pad) * rows + pad, (w + pad) * columns + pad, channels), dtype=np.float32) * 0.5
    for i in range(n):
        r, c = divmod(i, columns)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = pixels[i]
    grid8 = (grid * 255 + 0.5).astype(np.uint8)
    image = Image.fromarray(grid8[:, :, 0] if channels == 1 else grid8)
    if scale != 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
