"""Atomic publication of files and folders: the one helper every module writes through.

A reader (a resumed run, another rank, a concurrent tool) sees either the previous
version of a path or the complete new one, never half a file: the content is written
under a temporary name in the same folder (same file system) and moved into place with
:func:`os.replace` (one rename; for a folder that already exists, two renames with the
old one restored on failure). On an error the temporary file or folder is removed and the
previous version is left as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike, *, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; on a clean exit it replaces ``path``.

    Args:
        path: the file to publish; its parent folder is created.
        mode: optional permission bits of the published file (e.g. ``0o600`` for secrets).

    Yields:
        The temporary path (an empty file exists there) to write to, by name.

    Raises:
        Whatever the body raises; the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if mode is not None:
            os.chmod(tmp, mode)
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any], *, mode: int | None = None) -> Path:
    """Publish ``path`` atomically by calling ``write(tmp_path)``; returns ``Path(path)``."""
    with atomic_path(path, mode=mode) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, mode: int | None = None) -> Path:
    """Publish a UTF-8 text file atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), mode=mode)


def atomic_write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """Publish one JSON object per line (UTF-8, non-ASCII kept) atomically."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

    return atomic_write(path, write)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` published atomically (checkpoint state files)."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on a clean exit it replaces ``path``.

    An existing ``path`` (folder, file or link) is first moved aside and removed only once
    the new folder is in place; if that second rename fails it is moved back.

    Raises:
        Whatever the body raises; the temporary folder is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        publish_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Move a finished folder ``tmp`` to ``path`` (same file system), replacing what is there.

    An existing ``path`` is moved aside first and removed once ``tmp`` is in place; if that
    rename fails it is moved back, so ``path`` is never missing after an error.
    """
    tmp, path = Path(tmp), Path(path)
    old = None
    if path.exists() or path.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        old.rmdir()
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old, path)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    return path
