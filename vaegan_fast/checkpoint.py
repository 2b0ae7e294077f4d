"""Checkpoint files that are written atomically and verified when read.

Layout: a 16-byte magic line, the SHA-256 of the payload (32 bytes), the payload's length (8 bytes,
little-endian), then the payload, which is what torch.save writes. A reader sees the old file or the new one,
never half of one (write to a temporary file in the same folder, fsync, rename, fsync the folder); a file that
was truncated or altered afterwards fails its length or checksum test and is reported, never loaded.
"""
from __future__ import annotations

import hashlib
import io
import os
import struct
from pathlib import Path

import torch

MAGIC = b"VAEGAN_FAST_CK1\n"
_HEADER = len(MAGIC) + 32 + 8


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # a full disk shows up here at the latest, before the rename
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def atomic_save(obj, path: str | os.PathLike) -> None:
    """torch.save ``obj`` into a checksummed file at ``path``, atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    atomic_write_bytes(MAGIC + hashlib.sha256(payload).digest() + struct.pack("<Q", len(payload)) + payload, path)


def load(path: str | os.PathLike, map_location=None) -> dict:
    """Read a file written by atomic_save, checking its length and checksum first."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint {path} is a folder; give the checkpoint file (e.g. {path}/checkpoint.pt)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    raw = path.read_bytes()
    if not raw.startswith(MAGIC):
        raise ValueError(f"checkpoint {path} is corrupt or not a vaegan_fast checkpoint (bad header)")
    if len(raw) < _HEADER:
        raise ValueError(f"checkpoint {path} is truncated ({len(raw)} bytes, shorter than its header)")
    digest, (length,) = raw[len(MAGIC):len(MAGIC) + 32], struct.unpack("<Q", raw[len(MAGIC) + 32:_HEADER])
    payload = raw[_HEADER:]
    if len(payload) != length:
        raise ValueError(f"checkpoint {path} is truncated or corrupt: its payload should be {length} bytes, "
                         f"the file holds {len(payload)}")
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError(f"checkpoint {path} is corrupt: its checksum does not match its contents")
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as exc:  # a payload with a valid checksum that torch cannot read: another program's file
        raise ValueError(f"checkpoint {path} holds data this version cannot read: {exc}") from exc
