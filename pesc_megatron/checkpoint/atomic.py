"""Atomic writes: a file or a folder is replaced whole or not at all, so a reader, a crash, a
power cut or a full disk never leaves a half-written one (written, fsynced, then renamed; the
directory fsynced after the rename)."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A hidden temporary path beside `path` to write to; renamed onto `path` when the block
    completes, removed if it raises. Made with the process's umask like any new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def fsync(path: Path) -> None:
    """Flushes a file's or a directory's data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def new_partial(out: Path) -> Path:
    """A fresh hidden folder beside `out` to build it in (`publish` makes it `out`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))


def publish(partial: Path, out: Path) -> None:
    """Moves the finished folder `partial` to `out`, replacing an old `out` only at the end."""
    for folder, _, files in os.walk(partial):  # (dist_checkpointing fsyncs its own files)
        for name in files:
            fsync(Path(folder) / name)
        fsync(Path(folder))
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)  # left by an earlier interrupted replacement
    if out.exists():
        os.replace(out, old)
    os.replace(partial, out)
    fsync(out.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """Yields a fresh folder beside `out` (single process); it becomes `out` when the block
    succeeds and is removed when it fails, so `out` is never half-written."""
    partial = new_partial(out)
    try:
        yield partial
        publish(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
