"""Atomic folder writes: build in a temporary sibling folder, fsync, then rename into place.

A checkpoint is written into ``<parent>/.<name>.tmp-<pid>-<random>``; every file and the folder are fsynced, then the
folder is renamed to ``<name>``. When ``<name>`` already exists it is first renamed aside to
``.<name>.old-<pid>-<random>`` and removed after the new folder is in place. ``rename(2)`` of a folder is atomic on
POSIX file systems, so a crash or SIGKILL leaves ``<name>`` either as it was (old or absent) or complete. The one
window without a ``<name>`` is between the two renames (old aside, new not yet in); :func:`recover` (called by every
later write and read of that path) moves the newest complete ``.old`` folder back if the new one never arrived.

Loading never looks at temporary folders, and the manifest is written last inside the temporary folder, so even a
non-atomic copy of a half-written folder has no ``tensorslim.json`` and is refused.

Limits: atomic only within one file system (the temporary folder is a sibling, so it always is); Windows folder
renames over open files are not handled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..errors import CheckpointError

logger = logging.getLogger(__name__)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _siblings(final: Path, kind: str) -> list[Path]:
    prefix = f".{final.name}.{kind}-"
    if not final.parent.is_dir():
        return []
    return sorted(p for p in final.parent.iterdir() if p.name.startswith(prefix))


def _owner_pid(p: Path) -> int | None:
    try:
        return int(p.name.rsplit("-", 2)[-2])
    except (ValueError, IndexError):
        return None


def recover(final: Path) -> None:
    """Clean up after a killed writer: drop dead writers' temp folders; restore an old folder left aside."""
    final = Path(final)
    for tmp in _siblings(final, "tmp"):
        pid = _owner_pid(tmp)
        if pid is not None and not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)
    olds = [p for p in _siblings(final, "old") if not _pid_alive(_owner_pid(p) or -1)]
    if not olds:
        return
    if not final.exists():
        newest = max(olds, key=lambda p: p.stat().st_mtime_ns)
        os.replace(newest, final)
        fsync_dir(final.parent)
        logger.warning("restored %s from %s left by an interrupted write", final, newest.name)
        olds.remove(newest)
    for p in olds:
        shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(final: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder; on normal exit it replaces ``final`` atomically, on error it is removed."""
    final = Path(final).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    recover(final)
    if final.exists() and not overwrite:
        raise CheckpointError(f"{final} exists; pass overwrite=True or choose another folder")
    if final.exists() and not final.is_dir():
        raise CheckpointError(f"{final} exists and is not a folder; choose another output path")
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = final.parent / f".{final.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                fsync_file(p)
        fsync_dir(tmp)
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{tag}"
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write one file atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
