"""Atomic file writes: every file qft writes appears whole or not at all.

A file is written under a temporary name in the same folder, flushed to disk, then renamed over its
destination (``os.replace`` is atomic on POSIX), so a crash mid-save leaves the previous version intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from qft.errors import QftError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "model.safetensors")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def publish_dir_atomic(staging: Path, dest: Path) -> None:
    """Move every file of ``staging`` into ``dest``, each by an atomic rename, then remove ``staging``.

    ``staging`` must be on the same filesystem as ``dest`` (make it with :func:`staging_dir`).
    """
    dest.mkdir(parents=True, exist_ok=True)
    for src in sorted(staging.rglob("*")):
        if src.is_file():
            target = dest / src.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, target)
    shutil.rmtree(staging, ignore_errors=True)
    _fsync_dir(dest)


def staging_dir(dest: Path) -> Path:
    """A fresh temporary folder beside ``dest`` (same filesystem, so renames are atomic)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.staging-"))


def holds_adapter(path: Path) -> bool:
    return any((path / name).exists() for name in ADAPTER_FILES)


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an output folder that already holds an adapter (unless ``overwrite``) or can't be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise QftError(f"output path {path} is a file, not a folder", "pass --output a folder path")
    if path.is_dir() and holds_adapter(path) and not overwrite:
        raise QftError(
            f"output folder {path} already holds an adapter",
            "pass --overwrite to replace it, or choose another --output",
        )
    parent = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise QftError(f"output folder {path} is not writable", "choose an --output folder you can write to")
    return path
