"""The token store: one source tokenised, read in place by every rank.

A store is a folder:
- `ids.bin`: every kept sample's token ids end to end (uint16 when the vocabulary fits, else
  int32; `store.json` says which);
- `mask.bin`: uint8, the loss mask aligned with the ids (formats.py's convention);
- `offsets.bin`: int64 [samples + 1], sample k is `ids[offsets[k]:offsets[k+1]]`;
- `store.json`: what was read and how (tokenizer identity, loss policy, format version, source),
  and its counts: records, empty targets, skipped records by reason with the first examples.
Readers take each sample with `os.pread` (FileArray) instead of mapping the files: the kernel's
page cache holds one copy per node, shared by its ranks, and no process maps it, so a rank's
resident memory does not grow with the data or with what it has read (a map would count every
page touched, and readahead touches most of a randomly read file). Why not megatron-core's
`IndexedDataset`: it holds one dtype per `.bin`, so the mask would need a second dataset with
its own index duplicating the first; three flat arrays need no index at all and no
megatron-core import to write (`pesc preprocess` runs anywhere).
A store is written in a hidden folder and renamed into place when complete (checkpoint/atomic),
so a reader never sees half of one and a crash leaves nothing behind.

Tokenisation runs in `num_workers` processes (forked, so they share the loaded tokenizer): the
reader streams chunks to them, at most 2 per worker in flight, and writes their results in
order, so the store does not depend on the number of workers.
"""
from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing as mp
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from pesc_megatron.checkpoint.atomic import new_partial, publish
from pesc_megatron.data.formats import FORMAT_VERSION, DataError, render_record
from pesc_megatron.data.sources import Chunk, Source, chunk_records, iter_chunks
from pesc_megatron.data.tokenizer import Tokenizer

STORE_VERSION = 1  # layout of the store's files
MARKER = "pesc-token-store"
EXAMPLES = 5  # skipped records kept as examples (their counts are all kept)


@dataclass
class ChunkTokens:
    """What a worker makes of one chunk."""

    ids: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    records: int
    empty_target: int
    skipped: list  # [where, kind, reason]
    error: Optional[tuple] = None  # (where, reason, kind): the first bad record, on_error=raise


class FileArray:
    """A 1-D or 2-D array stored in a file (raw, or the data of a .npy), read by `os.pread`:
    `a[i]` and `a[i:j]` read just those rows; `np.asarray(a)` maps the whole file (for one-off
    passes over all of it). The descriptor opens lazily in each process (forked workers too)."""

    def __init__(self, path: str | os.PathLike, dtype, shape: tuple, offset: int = 0):
        self.path, self.dtype, self.shape, self.offset = str(path), np.dtype(dtype), shape, offset
        self.row = self.dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        self._fd, self._pid = None, None

    @classmethod
    def raw(cls, path: Path, dtype) -> "FileArray":
        return cls(path, dtype, (path.stat().st_size // np.dtype(dtype).itemsize,))

    @classmethod
    def npy(cls, path: Path) -> "FileArray":
        m = np.load(path, mmap_mode="r")
        return cls(path, m.dtype, m.shape, m.offset)

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, start: int, stop: int) -> np.ndarray:
        if self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        count = max(0, stop - start)
        data = os.pread(self._fd, count * self.row, self.offset + start * self.row)
        return np.frombuffer(data, self.dtype).reshape((count,) + self.shape[1:])

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"index {key} out of range for {len(self)} rows")
            row = self._read(i, i + 1)[0]
            return row if row.ndim else row[()]
        if isinstance(key, slice) and key.step in (None, 1):
            start, stop, _ = key.indices(len(self))
            return self._read(start, stop)
        return np.asarray(self)[key]

    def __array__(self, dtype=None, copy=None):
        if not len(self):
            return np.zeros(self.shape, dtype or self.dtype)
        m = np.memmap(self.path, self.dtype, "r", self.offset, self.shape)
        return m if dtype is None else m.astype(dtype)

    def __getstate__(self):  # no descriptor across processes
        return {**self.__dict__, "_fd": None, "_pid": None}


@dataclass
class TokenStore:
    ids: np.ndarray  # (or FileArray: a store on disk)
    mask: np.ndarray
    offsets: np.ndarray
    meta: dict = field(default_factory=dict)

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "TokenStore":
        folder = Path(folder)
        try:
            meta = json.loads((folder / "store.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(str(folder), f"not a readable token store ({e})", "bad store") from None
        if meta.get("format") != MARKER or meta.get("version") != STORE_VERSION:
            raise DataError(str(folder), f"token store version {meta.get('version')}, this "
                            f"pesc reads {STORE_VERSION}: run `pesc preprocess` again",
                            "bad store")

        return cls(FileArray.raw(folder / "ids.bin", np.dtype(meta["ids_dtype"])),
                   FileArray.raw(folder / "mask.bin", np.uint8),
                   FileArray.raw(folder / "offsets.bin", np.int64), meta)


def store_key(src: Source, tok: Tokenizer, loss_on: str) -> str:
    """What a store's tokens depend on: the source's bytes and reading, the tokenizer (and
    chat template), the loss policy and the format and layout versions."""
    h = hashlib.sha256(f"{tok.identity}/{loss_on}/{FORMAT_VERSION}/{STORE_VERSION}\0".encode())
    h.update(src.identity().encode())
    return h.hexdigest()[:24]


def ids_dtype(tok: Tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if tok.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32)


def tokenize_chunk(chunk: Chunk, tok: Tokenizer, loss_on: str, on_error: str) -> ChunkTokens:
    ids, mask, lengths, skipped = [], [], [], []
    records = empty = 0
    for where, record in chunk_records(chunk):
        records += 1
        try:
            if isinstance(record, DataError):
                raise record
            r_ids, r_mask = render_record(record, tok, where, loss_on)
        except DataError as e:
            if on_error == "raise":  # (an exception would not survive pickling whole)
                return ChunkTokens(*_arrays([], [], [], tok), records, empty, skipped,
                                   (e.where, e.reason, e.kind))
            skipped.append([e.where, e.kind, e.reason])
            continue
        if not any(r_mask):
            empty += 1
            continue
        ids += r_ids
        mask += r_mask
        lengths.append(len(r_ids))
    return ChunkTokens(*_arrays(ids, mask, lengths, tok), records, empty, skipped)


def _arrays(ids, mask, lengths, tok):
    return (np.asarray(ids, ids_dtype(tok)), np.asarray(mask, np.uint8),
            np.asarray(lengths, np.int64))


_WORKER: tuple = ()  # (tok, loss_on, on_error) in a worker process


def _start_worker(*args) -> None:
    global _WORKER
    _WORKER = args


def _work(chunk: Chunk) -> ChunkTokens:
    return tokenize_chunk(chunk, *_WORKER)


def tokenized_chunks(src: Source, tok: Tokenizer, loss_on: str, on_error: str,
                     num_workers: int = 1) -> Iterator[ChunkTokens]:
    """The source's chunks tokenised, in order; a bad record under on_error=raise raises."""
    chunks = iter_chunks(src)
    if num_workers <= 1:
        results = (tokenize_chunk(c, tok, loss_on, on_error) for c in chunks)
        yield from _raising(results)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # each worker is one thread
    # concurrent.futures, not multiprocessing.Pool: the workers inherit `pesc train`'s SIGTERM
    # handler (train/preemption.py), which records the signal instead of exiting, and
    # Pool.terminate() on leaving relies on SIGTERM to end a worker still waiting for a task:
    # `pesc train` hung there (tests/data/test_sources.py). The executor ends its workers with
    # sentinels, and a worker that dies fails the build (BrokenProcessPool) instead of losing
    # its chunk and waiting for it forever.
    pool = ProcessPoolExecutor(num_workers, mp.get_context("fork"), initializer=_start_worker,
                               initargs=(tok, loss_on, on_error))
    try:
        pending: collections.deque = collections.deque()

        def results() -> Iterator[ChunkTokens]:
            for c in chunks:
                pending.append(pool.submit(_work, c))
                if len(pending) >= 2 * num_workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

        yield from _raising(results())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _raising(results: Iterator[ChunkTokens]) -> Iterator[ChunkTokens]:
    for r in results:
        if r.error is not None:
            raise DataError(*r.error)
        yield r


def _meta(src: Source, tok: Tokenizer, loss_on: str, counts: dict, key: str = "") -> dict:
    return {"format": MARKER, "version": STORE_VERSION, "key": key,
            "format_version": FORMAT_VERSION,
            "ids_dtype": ids_dtype(tok).name, "tokenizer": tok.identity, "loss_on": loss_on,
            "source": src.path, "columns": src.columns, "split": src.split, **counts}


def _count(counts: dict, r: ChunkTokens) -> None:
    counts["records"] += r.records
    counts["empty_target"] += r.empty_target
    for where, kind, reason in r.skipped:
        counts["skipped"][kind] = counts["skipped"].get(kind, 0) + 1
        if len(counts["skipped_examples"]) < EXAMPLES:
            counts["skipped_examples"].append([where, kind, reason])


def _new_counts() -> dict:
    return {"records": 0, "empty_target": 0, "skipped": {}, "skipped_examples": [],
            "samples": 0, "tokens": 0}


def write_store(out: str | os.PathLike, src: Source, tok: Tokenizer, loss_on: str = "assistant",
                on_error: str = "raise", num_workers: int = 1,
                key: Optional[str] = None) -> TokenStore:
    """Tokenises `src` into the store folder `out` (replaced whole, or left as it was); `key`:
    its store_key, when the caller has it already."""
    out = Path(out)
    key = key or store_key(src, tok, loss_on)
    partial = new_partial(out)
    try:
        counts, end = _new_counts(), 0
        with open(partial / "ids.bin", "wb") as f_ids, open(partial / "mask.bin", "wb") as f_mask, \
                open(partial / "offsets.bin", "wb") as f_off:
            f_off.write(np.zeros(1, np.int64).tobytes())
            for r in tokenized_chunks(src, tok, loss_on, on_error, num_workers):
                _count(counts, r)
                f_ids.write(r.ids.tobytes())
                f_mask.write(r.mask.tobytes())
                f_off.write((end + np.cumsum(r.lengths)).tobytes())
                end += int(r.lengths.sum())
                counts["samples"] += len(r.lengths)
        counts["tokens"] = end
        (partial / "store.json").write_text(json.dumps(
            _meta(src, tok, loss_on, counts, key), indent=1))
        publish(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return TokenStore.open(out)


def memory_store(src: Source, tok: Tokenizer, loss_on: str = "assistant",
                 on_error: str = "raise", num_workers: int = 1) -> TokenStore:
    """The store of `src` in memory (no cache folder)."""
    counts, parts = _new_counts(), []
    for r in tokenized_chunks(src, tok, loss_on, on_error, num_workers):
        _count(counts, r)
        parts.append(r)
    lengths = np.concatenate([np.zeros(1, np.int64)] + [r.lengths for r in parts])
    counts["samples"], counts["tokens"] = len(lengths) - 1, int(lengths.sum())
    return TokenStore(np.concatenate([np.zeros(0, ids_dtype(tok))] + [r.ids for r in parts]),
                      np.concatenate([np.zeros(0, np.uint8)] + [r.mask for r in parts]),
                      np.cumsum(lengths), _meta(src, tok, loss_on, counts))


def check_store(store: TokenStore, where: str, tok: Tokenizer, loss_on: str) -> None:
    """A store given as data must match the run's tokenizer and loss policy."""
    meta = store.meta
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(where, f"tokenised with record format version {meta.get('format_version')}"
                        f", this pesc uses {FORMAT_VERSION}: run `pesc preprocess` again",
                        "bad store")
    if meta.get("tokenizer") != tok.identity:
        raise DataError(where, "tokenised with another tokenizer (or chat template) than this "
                        "run's: run `pesc preprocess` with this run's tokenizer", "bad store")
    if meta.get("loss_on") != loss_on:
        raise DataError(where, f"tokenised with loss_on {meta.get('loss_on')!r}, but "
                        f"data.loss_on is {loss_on!r}", "bad store")
