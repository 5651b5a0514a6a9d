"""Files -> tokenised samples (cached on disk) -> policies -> weighted mix -> sequences.

    ds = build_dataset(["a.jsonl", ("b.json", 0.5)], tok, seq_length=512, packing=True,
                       cache_dir="cache/", on_error="raise")
    ds[i]  # {"tokens", "labels", "loss_mask", "position_ids", "padding_mask": [s],
    #         "cu_seqlens": [samples + 1] (packed only)}

Files: JSONL (one record a line, blank lines ignored; errors name `file:line`) or one JSON array
(a file whose first non-blank character is `[`; errors name `file: record i`, 0-based).
Bad records: `on_error="raise"` stops at the first with its DataError; `"skip"` drops them and
counts them by reason in `stats.skipped` (a file that is not valid JSON as a whole always raises).
Policies, in this order, each counted in `stats`:
- empty target: a record with no target token (formats.py) is dropped (`empty_target`);
- over-long, a sample of n ids needing n - 1 > seq_length positions: `overlong="truncate"`
  (default) keeps its first seq_length + 1 ids if a target remains among them (`truncated`),
  else drops it (`dropped_overlong`); `overlong="drop"` always drops it (`dropped_overlong`).
A dataset with no sample left is a DataError.
Mixing: a weight w (default 1) takes a file's kept samples w times over: int(w) full copies plus
a seeded random subset of round(frac(w) * n) samples; all are then shuffled by `seed`.
Sequences: each sample is shifted on its own (tokens = ids[:-1], labels = ids[1:]) and so fills
n - 1 of the seq_length positions; no label ever crosses into another sample.
- unpacked: one sample a sequence, padded (pad_id, loss_mask 0); causal attention.
- packed: greedy first-fit of samples, in the mixed order, into sequences of seq_length
  positions; position_ids restart at 0 per sample; `cu_seqlens` holds the sample boundaries
  (0, n0 - 1, ..., s), each sample attending causally to itself only; the padding tail is a
  sample of its own so that no position attends to nothing. No [s, s] mask is built: the
  attention reads the boundaries (model/attention.py).
Both carry `padding_mask` [s] (True = padding), which keeps pad positions out of the router's
balancing loss and load statistics.
Cache: per file, `{stem}-{key}.npz` under cache_dir, key = sha256 of (file bytes, tokenizer
identity, FORMAT_VERSION). Only tokenisation is cached, so other seq_length/policy/weight/seed
settings reuse it; skipped records are stored too (a later on_error="raise" still raises).
Written to a temp file and renamed, so readers never see half a file. The `builder` process
writes missing caches, then everyone calls `barrier()` and reads them: pass builder = (rank == 0)
and a real barrier when ranks share cache_dir (local rank 0 for a node-local one). A builder
that raises (a bad record under on_error="raise") leaves the others at the barrier: the caller
must abort the job.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from pesc_megatron.checkpoint.atomic import atomic_path
from pesc_megatron.data.formats import FORMAT_VERSION, DataError, render_record
from pesc_megatron.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)
CACHE_VERSION = 1  # layout of the .npz files
ON_ERROR = ("raise", "skip")
OVERLONG = ("truncate", "drop")
FileSpec = Union[str, os.PathLike, tuple]  # path or (path, weight)


@dataclass
class DataStats:
    records: int = 0  # records read (JSON values), including skipped ones
    skipped: dict = field(default_factory=dict)  # reason kind -> count
    skipped_examples: list = field(default_factory=list)  # first few "file:line: reason"
    empty_target: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    samples: int = 0  # after policies and mixing
    sequences: int = 0
    tokens: int = 0  # input positions filled by samples (padding excluded)
    target_tokens: int = 0  # positions whose label counts

    def summary(self) -> str:
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "0"
        return (f"{self.records} records, skipped {skipped}, {self.empty_target} empty targets, "
                f"{self.truncated} truncated, {self.dropped_overlong} over-long dropped; "
                f"{self.samples} samples in {self.sequences} sequences, {self.tokens} tokens, "
                f"{self.target_tokens} targets")


@dataclass
class FileTokens:
    """One file tokenised: sample k is ids[offsets[k]:offsets[k+1]] (likewise mask)."""

    ids: np.ndarray  # int32
    mask: np.ndarray  # uint8
    offsets: np.ndarray  # int64, [samples + 1]
    records: int
    empty_target: int
    skipped: list  # [where, kind, reason]


def read_records(path: str | os.PathLike) -> Iterator[tuple[str, object]]:
    """(where, record) pairs; a line that is not JSON yields a DataError as its record."""
    path = str(path)
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(path, f"not UTF-8 text ({e.reason} at byte {e.start})",
                        "not UTF-8") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}", f"invalid JSON: {e.msg}",
                            "invalid JSON") from None
        for i, r in enumerate(records):
            yield f"{path}: record {i}", r
        return
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{n}", DataError(f"{path}:{n}", f"invalid JSON: {e.msg}",
                                               "invalid JSON")


def tokenize_file(path: str | os.PathLike, tok: Tokenizer, on_error: str = "raise") -> FileTokens:
    ids, mask, offsets, skipped = [], [], [0], []
    records = empty = 0
    for where, record in read_records(path):
        records += 1
        try:
            if isinstance(record, DataError):
                raise record
            r_ids, r_mask = render_record(record, tok, where)
        except DataError as e:
            if on_error == "raise":
                raise
            skipped.append([e.where, e.kind, e.reason])
            continue
        if not any(r_mask):
            empty += 1
            continue
        ids += r_ids
        mask += r_mask
        offsets.append(len(ids))
    return FileTokens(np.asarray(ids, np.int32), np.asarray(mask, np.uint8),
                      np.asarray(offsets, np.int64), records, empty, skipped)


def cache_path(cache_dir: str | os.PathLike, path: str | os.PathLike, tok: Tokenizer) -> Path:
    h = hashlib.sha256(f"{tok.identity}/{FORMAT_VERSION}/{CACHE_VERSION}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return Path(cache_dir) / f"{Path(path).stem}-{h.hexdigest()[:24]}.npz"


def save_tokens(ft: FileTokens, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    meta = json.dumps({"records": ft.records, "empty_target": ft.empty_target,
                       "skipped": ft.skipped})
    with atomic_path(target) as tmp, open(tmp, "wb") as f:  # readers: no file or all of it
        np.savez(f, ids=ft.ids, mask=ft.mask, offsets=ft.offsets, meta=np.array(meta))


def load_tokens(source: Path) -> FileTokens:
    with np.load(source, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        return FileTokens(z["ids"], z["mask"], z["offsets"], meta["records"],
                          meta["empty_target"], meta["skipped"])


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Greedy first-fit: item i goes to the lowest-numbered bin with room (each length must be
    <= capacity). A max-tree over the bins' free room finds that bin in O(log n)."""
    size = 1 << max(1, (len(lengths) - 1).bit_length())
    tree = [capacity] * (2 * size)  # leaves: free room of bin j (unopened bins are empty)
    bins: list[list[int]] = []
    for i, length in enumerate(lengths):
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= length else 2 * node + 1
        j = node - size
        if j == len(bins):
            bins.append([])
        bins[j].append(i)
        tree[node] -= length
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return bins


class TokenDataset(torch.utils.data.Dataset):
    """Sequences of seq_length positions; see the module docstring for the layout."""

    def __init__(self, files: list[FileTokens], samples: np.ndarray, seq_length: int,
                 packing: bool, pad_id: int, stats: DataStats):
        self.files, self.samples = files, samples  # samples: [N, 3] = (file, start, n_ids)
        self.seq_length, self.packing, self.pad_id, self.stats = seq_length, packing, pad_id, stats
        positions = (samples[:, 2] - 1).tolist()
        self.bins = first_fit(positions, seq_length) if packing else [[k] for k in
                                                                     range(len(samples))]
        stats.sequences = len(self.bins)

    def __len__(self) -> int:
        return len(self.bins)

    def sample_boundaries(self, i: int) -> list[int]:
        """Start positions of sequence i's samples and the end of the last: [0, n0-1, ...]."""
        return np.concatenate([[0], np.cumsum(self.samples[self.bins[i], 2] - 1)]).tolist()

    def __getitem__(self, i: int) -> dict:
        s = self.seq_length
        tokens = np.full(s, self.pad_id, np.int64)
        labels = np.full(s, self.pad_id, np.int64)
        loss_mask = np.zeros(s, np.float32)
        position_ids = np.arange(s)
        bounds = [0]
        for k in self.bins[i]:
            f, start, n = self.samples[k]
            p = bounds[-1]
            ids = self.files[f].ids[start:start + n]
            tokens[p:p + n - 1], labels[p:p + n - 1] = ids[:-1], ids[1:]
            loss_mask[p:p + n - 1] = self.files[f].mask[start + 1:start + n]
            position_ids[p:p + n - 1] = np.arange(n - 1)
            bounds.append(p + n - 1)
        p = bounds[-1]
        position_ids[p:] = np.arange(s - p)
        padding_mask = np.arange(s) >= p
        item = {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
                "loss_mask": torch.from_numpy(loss_mask),
                "position_ids": torch.from_numpy(position_ids),
                "padding_mask": torch.from_numpy(padding_mask)}
        if self.packing:
            if p < s:
                bounds.append(s)  # the padding tail attends to itself only
            item["cu_seqlens"] = torch.tensor(bounds, dtype=torch.int32)
        return item


def collate(batch: list[dict]) -> dict:
    """Stacks ds[i] dicts into a micro batch ([b, s] tensors). Packed sequences also give
    `cu_seqlens`: the sample boundaries of the b sequences laid end to end (int32, [n + 1]),
    with `max_seqlen`, from which `train.step` builds megatron-core's THD PackedSeqParams."""
    out = {k: torch.stack([b[k] for b in batch]) for k in batch[0] if k != "cu_seqlens"}
    if "cu_seqlens" in batch[0]:
        s = batch[0]["tokens"].shape[0]
        cu = torch.cat([batch[0]["cu_seqlens"][:1]]
                       + [b["cu_seqlens"][1:] + j * s for j, b in enumerate(batch)])
        out["cu_seqlens"] = cu
        out["max_seqlen"] = int((cu[1:] - cu[:-1]).max())
    return out


def build_dataset(files: Sequence[FileSpec], tokenizer: Tokenizer, seq_length: int,
                  packing: bool = False, cache_dir: Optional[str | os.PathLike] = None,
                  on_error: str = "raise", overlong: str = "truncate", seed: int = 0,
                  builder: bool = True, barrier: Callable[[], None] = lambda: None
                  ) -> TokenDataset:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, not {on_error!r}")
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {OVERLONG}, not {overlong!r}")
    entries = [(f, 1.0) if isinstance(f, (str, os.PathLike)) else (f[0], float(f[1]))
               for f in files]
    for path, weight in entries:
        if not Path(path).is_file():
            raise DataError(str(path), "data file not found", "missing file")
        if not weight > 0:
            raise DataError(str(path), f"weight must be > 0, not {weight}", "bad weight")
    caches = [cache_path(cache_dir, p, tokenizer) if cache_dir else None for p, _ in entries]
    built: dict[int, FileTokens] = {}
    if builder:
        for j, (path, _) in enumerate(entries):
            if caches[j] is None or not caches[j].is_file():
                built[j] = tokenize_file(path, tokenizer, on_error)
                if caches[j] is not None:
                    save_tokens(built[j], caches[j])
    barrier()
    loaded = []
    for j, (path, _) in enumerate(entries):
        if j not in built and caches[j] is None:  # no cache to share: tokenise here too
            built[j] = tokenize_file(path, tokenizer, on_error)
        if j not in built and not caches[j].is_file():
            raise DataError(str(path), f"token cache {caches[j]} missing after the barrier "
                            "(is cache_dir shared with the building rank?)", "missing cache")
        loaded.append(built[j] if j in built else load_tokens(caches[j]))
    return _assemble(entries, loaded, tokenizer, seq_length, packing, on_error, overlong, seed)


def _assemble(entries, loaded: list[FileTokens], tok: Tokenizer, seq_length: int, packing: bool,
              on_error: str, overlong: str, seed: int) -> TokenDataset:
    stats = DataStats()
    rng = np.random.default_rng(seed)
    picked = []
    for j, ((path, weight), ft) in enumerate(zip(entries, loaded)):
        if ft.skipped and on_error == "raise":  # cached by an earlier on_error="skip" run
            where, kind, reason = ft.skipped[0]
            raise DataError(where, reason, kind)
        stats.records += ft.records
        stats.empty_target += ft.empty_target
        for where, kind, reason in ft.skipped:
            stats.skipped[kind] = stats.skipped.get(kind, 0) + 1
            if len(stats.skipped_examples) < 5:
                stats.skipped_examples.append(f"{where}: {reason}")
        kept = []
        for k in range(len(ft.offsets) - 1):
            start, n = int(ft.offsets[k]), int(ft.offsets[k + 1] - ft.offsets[k])
            if n - 1 > seq_length:
                n = seq_length + 1
                if overlong == "drop" or not ft.mask[start + 1:start + n].any():
                    stats.dropped_overlong += 1
                    continue
                stats.truncated += 1
            kept.append((j, start, n))
        whole, frac = int(weight), weight - int(weight)
        extra = rng.choice(len(kept), round(frac * len(kept)), replace=False) if kept else []
        picked += kept * whole + [kept[i] for i in sorted(extra)]
    if stats.skipped:
        log.warning("skipped %d bad records (%s), e.g. %s", sum(stats.skipped.values()),
                    ", ".join(f"{k}: {v}" for k, v in stats.skipped.items()),
                    stats.skipped_examples[0])
    if not picked:
        names = ", ".join(str(p) for p, _ in entries)
        raise DataError(names, "no sample with a trainable token (" + stats.summary() + ")",
                        "no targets")
    samples = np.asarray(picked, np.int64)[rng.permutation(len(picked))]
    stats.samples = len(samples)
    stats.tokens = int((samples[:, 2] - 1).sum())
    stats.target_tokens = int(sum(loaded[f].mask[s + 1:s + n].sum() for f, s, n in samples))
    return TokenDataset(loaded, samples, seq_length, packing, tok.pad_id, stats)
