"""Files -> tokenised samples (cached on disk) -> policies -> weighted mix -> sequences.

    ds = build_dataset(["a.jsonl", ("b.json", 0.5)], tok, seq_length=512, packing=True,
                       cache_dir="cache/", on_error="raise")
    ds[i]  # {"tokens", "labels", "loss_mask", "position_ids", "padding_mask": [s],
    #         "cu_seqlens": [samples + 1] (packed only)}

Sources (sources.py): JSONL / JSON arrays, Parquet, Arrow, `datasets` folders, and token
stores written by `pesc preprocess` (store.py), each entry a path or `{path, weight, columns,
split}`. Each is tokenised once into a token store (the cache) that every rank reads in place.
Bad records: `on_error="raise"` stops at the first with its DataError; `"skip"` drops them and
counts them by reason in `stats.skipped` (a file that cannot be read at all always raises).
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
Cache: per source, the store `{stem}-{key}/` under cache_dir, key = sha256 of (the source's
bytes, columns and split, tokenizer identity, loss policy, FORMAT_VERSION, STORE_VERSION). The
sample plan (which samples, in which sequences) is cached beside it as `plan-{key}/` (.npy
files, read row by row), keyed by the stores and every setting that changes it: a warm start
reads both and computes nothing. Skipped records are counted in the store too (a later
on_error="raise" still raises). Both are written to a hidden folder and renamed, so readers
never see half of one. The `builder` process writes what is missing, then everyone calls
`barrier()` and reads: pass builder = (rank == 0) and a real barrier when ranks share cache_dir
(local rank 0 for a node-local one). A builder that raises (a bad record under
on_error="raise") leaves the others at the barrier: the caller must abort the job.
Memory: a rank reads the store and plan files sample by sample (`os.pread`, store.FileArray):
its memory does not grow with the data, and the page cache holds one copy per node.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from pesc_megatron.checkpoint.atomic import new_partial, publish
from pesc_megatron.data.formats import LOSS_ON, DataError
from pesc_megatron.data.sources import Source, parse_entry
from pesc_megatron.data.store import (
    FileArray,
    TokenStore,
    check_store,
    memory_store,
    store_key,
    write_store,
)
from pesc_megatron.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)
PLAN_VERSION = 1  # layout of the plan files
ON_ERROR = ("raise", "skip")
OVERLONG = ("truncate", "drop")
FileSpec = Union[str, os.PathLike, tuple, dict]  # path, (path, weight) or a data entry dict


@dataclass
class DataStats:
    records: int = 0  # records read, including skipped ones
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


class Plan:
    """Which samples, in which sequences: `samples` [N, 3] = (store, start, n_ids) in the mixed
    order; packed, sequence i holds samples `items[bounds[i]:bounds[i+1]]`, else sample i."""

    def __init__(self, samples: np.ndarray, items: Optional[np.ndarray],
                 bounds: Optional[np.ndarray], stats: DataStats):
        self.samples, self.items, self.bounds, self.stats = samples, items, bounds, stats

    def __len__(self) -> int:
        return len(self.samples) if self.bounds is None else len(self.bounds) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        if self.bounds is None:
            return np.array([i])
        start, stop = self.bounds[i:i + 2]
        return self.items[int(start):int(stop)]

    def save(self, out: Path) -> None:
        partial = new_partial(out)
        try:
            np.save(partial / "samples.npy", self.samples)
            if self.bounds is not None:
                np.save(partial / "items.npy", self.items)
                np.save(partial / "bounds.npy", self.bounds)
            (partial / "stats.json").write_text(json.dumps(asdict(self.stats)))
            publish(partial, out)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise

    @classmethod
    def load(cls, folder: Path) -> "Plan":
        """Read row by row (FileArray): a rank holds none of it in memory."""
        arrays = {n: FileArray.npy(folder / f"{n}.npy") if (folder / f"{n}.npy").is_file()
                  else None for n in ("samples", "items", "bounds")}
        stats = DataStats(**json.loads((folder / "stats.json").read_text()))
        return cls(arrays["samples"], arrays["items"], arrays["bounds"], stats)


class TokenDataset(torch.utils.data.Dataset):
    """Sequences of seq_length positions; see the module docstring for the layout."""

    def __init__(self, stores: list[TokenStore], plan: Plan, seq_length: int, packing: bool,
                 pad_id: int):
        self.stores, self.plan, self.samples = stores, plan, plan.samples
        self.seq_length, self.packing, self.pad_id, self.stats = (seq_length, packing, pad_id,
                                                                  plan.stats)
        self.bins = plan  # bins[i]: the sample indices of sequence i

    def __len__(self) -> int:
        return len(self.plan)

    def sample_boundaries(self, i: int) -> list[int]:
        """Start positions of sequence i's samples and the end of the last: [0, n0-1, ...]."""
        lengths = [int(self.samples[k][2]) - 1 for k in self.bins[i]]
        return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).tolist()

    def __getitem__(self, i: int) -> dict:
        s = self.seq_length
        tokens = np.full(s, self.pad_id, np.int64)
        labels = np.full(s, self.pad_id, np.int64)
        loss_mask = np.zeros(s, np.float32)
        position_ids = np.arange(s)
        bounds = [0]
        for k in self.bins[i]:
            f, start, n = (int(v) for v in self.samples[k])
            p = bounds[-1]
            ids = self.stores[f].ids[start:start + n]
            tokens[p:p + n - 1], labels[p:p + n - 1] = ids[:-1], ids[1:]
            loss_mask[p:p + n - 1] = self.stores[f].mask[start + 1:start + n]
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
                  builder: bool = True, barrier: Callable[[], None] = lambda: None,
                  loss_on: str = "assistant", num_workers: int = 1) -> TokenDataset:
    for name, value, allowed in (("on_error", on_error, ON_ERROR), ("overlong", overlong,
                                 OVERLONG), ("loss_on", loss_on, LOSS_ON)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, not {value!r}")
    sources = [parse_entry(f) for f in files]
    folders: list[Optional[Path]] = []
    keys: list[Optional[str]] = []
    for src in sources:
        key = store_key(src, tokenizer, loss_on) if cache_dir and src.kind != "store" else None
        keys.append(key)
        folders.append(Path(src.path) if src.kind == "store" else
                       Path(cache_dir) / f"{Path(src.path).stem}-{key}" if key else None)
    stores: dict[int, TokenStore] = {}
    if builder:
        for j, (src, folder) in enumerate(zip(sources, folders)):
            if folder is not None and not (folder / "store.json").is_file():
                stores[j] = write_store(folder, src, tokenizer, loss_on, on_error, num_workers,
                                        keys[j])
    for j, (src, folder) in enumerate(zip(sources, folders)):
        if folder is None:  # no cache to share: tokenise here
            stores[j] = memory_store(src, tokenizer, loss_on, on_error, num_workers)
    plan_dir = None
    if cache_dir is not None:
        idents = [k or _store_key(f) for k, f in zip(keys, folders)]  # (no race: see below)
        h = hashlib.sha256(json.dumps([PLAN_VERSION, idents,
                                       [s.weight for s in sources], seq_length, packing,
                                       on_error, overlong, seed]).encode())
        plan_dir = Path(cache_dir) / f"plan-{h.hexdigest()[:24]}"
    if builder and plan_dir is not None and not (plan_dir / "stats.json").is_file():
        opened = [stores.get(j) or _open(folders[j], sources[j], tokenizer, loss_on)
                  for j in range(len(sources))]
        make_plan(sources, opened, seq_length, packing, on_error, overlong, seed).save(plan_dir)
    barrier()
    opened = []
    for j, (src, folder) in enumerate(zip(sources, folders)):
        if j in stores:
            opened.append(stores[j])
            continue
        if not (folder / "store.json").is_file():
            raise DataError(src.path, f"token store {folder} missing after the barrier (is "
                            "cache_dir shared with the building rank?)", "missing cache")
        opened.append(_open(folder, src, tokenizer, loss_on))
    if plan_dir is None:
        plan = make_plan(sources, opened, seq_length, packing, on_error, overlong, seed)
    else:
        for src, st in zip(sources, opened):
            _check_skipped(st, on_error)
        plan = Plan.load(plan_dir)
    return TokenDataset(opened, plan, seq_length, packing, tokenizer.pad_id)


def _store_key(folder: Path) -> str:
    """A given store's key (its content's identity), from its store.json: it exists before the
    run (a cached store's key is known before it is written, so no rank waits for it)."""
    try:
        return json.loads((folder / "store.json").read_text())["key"]
    except (OSError, ValueError, KeyError):
        raise DataError(str(folder), "not a readable token store (store.json)", "bad store") \
            from None


def _open(folder: Path, src: Source, tok: Tokenizer, loss_on: str) -> TokenStore:
    store = TokenStore.open(folder)
    check_store(store, src.path, tok, loss_on)
    return store


def _check_skipped(store: TokenStore, on_error: str) -> None:
    if store.meta["skipped"] and on_error == "raise":  # cached by an earlier "skip" run
        where, kind, reason = store.meta["skipped_examples"][0]
        raise DataError(where, reason, kind)


def make_plan(sources: list[Source], stores: list[TokenStore], seq_length: int, packing: bool,
              on_error: str, overlong: str, seed: int) -> Plan:
    """The policies, the weighted mix and the packing, over arrays (one pass per store)."""
    stats = DataStats()
    rng = np.random.default_rng(seed)
    picked, targets = [], []
    for j, (src, st) in enumerate(zip(sources, stores)):
        _check_skipped(st, on_error)
        stats.records += st.meta["records"]
        stats.empty_target += st.meta["empty_target"]
        for kind, count in st.meta["skipped"].items():
            stats.skipped[kind] = stats.skipped.get(kind, 0) + count
        stats.skipped_examples += [f"{w}: {r}" for w, _, r in st.meta["skipped_examples"]]
        starts = np.asarray(st.offsets[:-1], np.int64)
        n = np.diff(np.asarray(st.offsets, np.int64))
        tgt = (np.add.reduceat(np.asarray(st.mask), starts, dtype=np.int64) if len(starts)
               else np.zeros(0, np.int64))
        keep = np.ones(len(n), bool)
        for k in np.flatnonzero(n - 1 > seq_length):  # over-long: few, so one by one
            head = int(st.mask[starts[k] + 1:starts[k] + seq_length + 1].sum())
            if overlong == "drop" or not head:
                keep[k] = False
                stats.dropped_overlong += 1
            else:
                n[k], tgt[k] = seq_length + 1, head
                stats.truncated += 1
        kept = np.stack([np.full(len(n), j), starts, n], axis=1)[keep]
        tgt = tgt[keep]
        whole, frac = int(src.weight), src.weight - int(src.weight)
        extra = (np.sort(rng.choice(len(kept), round(frac * len(kept)), replace=False))
                 if len(kept) else np.zeros(0, np.int64))
        picked += [kept] * whole + [kept[extra]]
        targets += [tgt] * whole + [tgt[extra]]
    stats.skipped_examples = stats.skipped_examples[:5]
    if stats.skipped:
        log.warning("skipped %d bad records (%s), e.g. %s", sum(stats.skipped.values()),
                    ", ".join(f"{k}: {v}" for k, v in stats.skipped.items()),
                    stats.skipped_examples[0])
    samples = np.concatenate(picked) if picked else np.zeros((0, 3), np.int64)
    if not len(samples):
        names = ", ".join(s.path for s in sources)
        raise DataError(names, "no sample with a trainable token (" + stats.summary() + ")",
                        "no targets")
    order = rng.permutation(len(samples))
    samples = samples[order]
    stats.samples = len(samples)
    stats.tokens = int((samples[:, 2] - 1).sum())
    stats.target_tokens = int(np.concatenate(targets)[order].sum())
    items = bounds = None
    if packing:
        bins = first_fit((samples[:, 2] - 1).tolist(), seq_length)
        items = np.fromiter((k for b in bins for k in b), np.int64, len(samples))
        bounds = np.cumsum([0] + [len(b) for b in bins], dtype=np.int64)
    plan = Plan(samples, items, bounds, stats)
    stats.sequences = len(plan)
    return plan
