"""Atomic file writes: every file qft writes appears whole or not at all.

A file is written under a temporary name in the same folder, flushed to disk, then renamed over its
destination (``os.replace`` is atomic on POSIX), so a crash mid-save leaves the previous version intact.
Also the checks on files qft reads: weights only as safetensors (no pickles unless allowed), headers intact.
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
# Configs are renamed into place last: a crash mid-publish can leave weights without their config (which
# nothing loads) but never a config that points at missing or older weights.
PUBLISH_LAST = ("adapter_config.json", "config.json")
PICKLE_WEIGHTS = ("adapter_model.bin", "pytorch_model*.bin", "model*.bin", "*.pt", "*.pth", "*.ckpt")
# files a Trainer checkpoint keeps beside the weights (loaded by transformers with torch.load(weights_only=True))
TRAINER_STATE_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth", "training_args.bin")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _new_file_mode() -> int:
    """The mode ``open()`` gives a new file under the process's umask (mkstemp's own is 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


NEW_FILE_MODE = _new_file_mode()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), NEW_FILE_MODE)  # readable as any file the user writes, not mkstemp's 0600
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
    files = sorted((p for p in staging.rglob("*") if p.is_file()), key=lambda p: (p.name in PUBLISH_LAST, str(p)))
    for src in files:
        target = dest / src.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(src, NEW_FILE_MODE)  # safetensors writes through a 0600 temporary file of its own
        os.replace(src, target)
    shutil.rmtree(staging, ignore_errors=True)
    _fsync_dir(dest)


@contextlib.contextmanager
def publishing(dest: Path, what: str = "adapter"):
    """Yield a staging folder to write into, then publish it into ``dest`` file by file, atomically.

    A failed write (disk full, permissions) removes the staging folder, leaves ``dest`` as it was and becomes
    one QftError.
    """
    staging = None
    try:
        staging = staging_dir(dest)
        yield staging
        publish_dir_atomic(staging, dest)
    except OSError as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        reason = os.strerror(exc.errno) if exc.errno else str(exc).splitlines()[0]
        raise QftError(f"could not save the {what} to {dest} ({reason.lower()}); what was there before is unchanged",
                       "free disk space or choose another --output, then run again") from exc
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise


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
    if not parent.is_dir():
        raise QftError(f"output folder {path} cannot be created: {parent} is a file", "choose another --output")
    try:  # a real write, not os.access: root passes os.access on read-only mounts
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise QftError(f"output folder {path} is not writable ({os.strerror(exc.errno or 0).lower()})",
                       "choose an --output folder you can write to") from exc
    return path


def check_safetensors(path: Path) -> None:
    """Raise a one-line QftError unless ``path`` is a whole safetensors file (header parses, sizes add up)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as exc:  # safetensors raises SafetensorError, OSError or ValueError by case
        detail = str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
        raise QftError(f"{path} is damaged or not a safetensors file ({detail})",
                       "save or copy it again; a partly written or truncated file is the usual cause") from exc


def check_weight_files(folder: Path, allow_pickle: bool = False, what: str = "adapter") -> None:
    """Check the weights in ``folder``: safetensors ones must be intact; pickled ones are refused unless allowed.

    Pickle files can run arbitrary code when loaded, so qft reads weights only as safetensors.
    """
    folder = Path(folder)
    safe = sorted(folder.glob("*.safetensors"))
    for f in safe:
        check_safetensors(f)
    pickles = sorted({p for pat in PICKLE_WEIGHTS for p in folder.glob(pat)} - {folder / n for n in TRAINER_STATE_FILES})
    if pickles and not safe and not allow_pickle:
        raise QftError(f"the {what} in {folder} is a pickle file ({pickles[0].name}), which can run code when loaded",
                       "convert it to safetensors, or pass --allow-pickle (allow_pickle=True) if you trust its source")
