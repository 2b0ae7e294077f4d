"""Image grids as PNG files (through Pillow)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch


def save_grid(images: torch.Tensor, image_shape: tuple, path: str | os.PathLike, columns: int | None = None,
              pad: int = 2, scale: int = 2) -> Path:
    """Tile rows of ``images`` ([n, H*W*C] in [0, 1]) into one PNG, ``columns`` per row."""
    from PIL import Image

    n = images.shape[0]
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    h, w = image_shape[:2]
    channels = image_shape[2] if len(image_shape) == 3 else 1
    pixels = images.detach().float().clamp(0, 1).cpu().reshape(n, h, w, channels).numpy()
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
