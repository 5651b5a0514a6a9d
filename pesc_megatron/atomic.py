"""Atomic file writes: a file is replaced whole or not at all, so a reader, a crash or a full
disk never leaves a half-written one (checkpoint folders have their own staging,
convert/checkpoint.staged)."""
from __future__ import annotations

import contextlib
import os
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
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
