"""Where records come from: a data entry names a source, which is read in chunks, streamed.

An entry (an item of `data.train` / `data.valid`, or a `pesc preprocess` input) is a path or
`{"path", "weight": 1.0, "columns": {field: column}, "split": "train"}`:
- `*.parquet`: Parquet, read by pyarrow row batch by row batch;
- `*.arrow`: an Arrow IPC file or stream, memory-mapped by pyarrow;
- a folder written by `datasets`' `save_to_disk` (`state.json` or `dataset_dict.json` in it):
  read through `datasets.load_from_disk` (memory-mapped Arrow); a DatasetDict takes `split`;
- a folder written by `pesc preprocess` (`store.json` in it): already tokenised (store.py);
- anything else: JSON Lines (one record a line, blank lines ignored; errors name `file:line`)
  or one JSON array (first non-blank character `[`; errors name `file: record i`, 0-based).
Arrow rows are dicts as `to_pylist` gives them, with null fields removed (a column another
record needed reads as null, which means "absent"); their errors name `file:row i`, 0-based.
`columns` renames fields before the format is detected: `{"messages": "dialog"}` reads column
(or JSON key) `dialog` as `messages`; a mapped column that is missing is an error.
No source is read whole: chunks of up to CHUNK records go to the tokenising workers.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from pesc_megatron.data.formats import DataError

CHUNK = 512  # records per chunk: small enough to balance workers, large enough to amortise
KINDS = ("json", "parquet", "arrow", "datasets", "store")


@dataclass
class Source:
    path: str
    weight: float = 1.0
    columns: dict = field(default_factory=dict)  # field name -> the source's column name
    split: Optional[str] = None  # a DatasetDict's split (default: train)

    @property
    def kind(self) -> str:
        p = Path(self.path)
        if p.is_dir():
            if (p / "store.json").is_file():
                return "store"
            if any((p / n).is_file() for n in ("state.json", "dataset_dict.json")):
                return "datasets"
            raise DataError(self.path, "a folder that is neither a `pesc preprocess` store nor "
                            "a `datasets` save_to_disk folder", "bad source")
        if p.suffix == ".parquet":
            return "parquet"
        if p.suffix == ".arrow":
            return "arrow"
        return "json"

    def identity(self) -> str:
        """sha256 of the source's bytes and of how it is read (columns, split)."""
        h = hashlib.sha256(json.dumps([self.kind, sorted(self.columns.items()), self.split])
                           .encode())
        p = Path(self.path)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode() + b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
        return h.hexdigest()


def parse_entry(entry: Any, where: str = "data") -> Source:
    """A config entry (path, or dict with path/weight/columns/split) as a checked Source."""
    if isinstance(entry, (str, os.PathLike)):
        src = Source(str(entry))
    elif isinstance(entry, (tuple, list)) and len(entry) == 2:
        src = Source(str(entry[0]), float(entry[1]))
    elif isinstance(entry, dict):
        unknown = set(entry) - {"path", "weight", "columns", "split"}
        if unknown or "path" not in entry:
            raise DataError(where, f"a data entry is a path or {{path, weight, columns, split}}"
                            f"; got keys {', '.join(sorted(entry))}", "bad entry")
        columns = entry.get("columns") or {}
        if not isinstance(columns, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in columns.items()):
            raise DataError(f"{where}: {entry['path']}", "columns must map field names to "
                            "column names (strings)", "bad entry")
        src = Source(str(entry["path"]), float(entry.get("weight", 1.0)), dict(columns),
                     entry.get("split"))
    else:
        raise DataError(where, f"a data entry is a path or a dict, not {entry!r}", "bad entry")
    if not Path(src.path).exists():
        raise DataError(src.path, "data file not found", "missing file")
    if not src.weight > 0:
        raise DataError(src.path, f"weight must be > 0, not {src.weight}", "bad weight")
    return src


@dataclass
class Chunk:
    """Up to CHUNK records, as cheap to send to a worker as the source allows."""

    path: str
    first: int  # line number (JSONL, 1-based), record index (JSON array) or row (Arrow)
    kind: str  # "lines": raw JSONL lines; "records": decoded values; "arrow": a RecordBatch
    payload: Any
    columns: dict


def iter_chunks(src: Source) -> Iterator[Chunk]:
    kind = src.kind
    if kind == "json":
        yield from _json_chunks(src)
    elif kind in ("parquet", "arrow", "datasets"):
        yield from _arrow_chunks(src, kind)
    else:
        raise DataError(src.path, "a token store has no records to read", "bad source")


def chunk_records(chunk: Chunk) -> Iterator[tuple[str, Any]]:
    """(where, record) pairs of a chunk, column mapping applied; a record that cannot be
    decoded or mapped comes as a DataError in its place."""
    if chunk.kind == "lines":
        for n, line in enumerate(chunk.payload, chunk.first):
            where = f"{chunk.path}:{n}"
            try:
                text = line.decode("utf-8-sig" if n == 1 else "utf-8")
                yield where, _mapped(json.loads(text), chunk.columns, where)
            except UnicodeDecodeError as e:
                yield where, DataError(where, f"not UTF-8 text ({e.reason} at byte {e.start})",
                                       "not UTF-8")
            except json.JSONDecodeError as e:
                yield where, DataError(where, f"invalid JSON: {e.msg}", "invalid JSON")
            except DataError as e:
                yield where, e
        return
    if chunk.kind == "records":
        rows, label = chunk.payload, f"{chunk.path}: record {{}}"
    else:
        rows, label = _arrow_rows(chunk.payload), f"{chunk.path}:row {{}}"
    for i, record in enumerate(rows, chunk.first):
        where = label.format(i)
        try:
            yield where, _mapped(record, chunk.columns, where)
        except DataError as e:
            yield where, e


def _mapped(record: Any, columns: dict, where: str) -> Any:
    if not columns or not isinstance(record, dict):
        return record
    missing = [c for c in columns.values() if c not in record]
    if missing:
        raise DataError(where, f"missing mapped column {missing[0]!r} (columns: "
                        f"{', '.join(f'{k}: {v}' for k, v in columns.items())})",
                        "missing column")
    out = {k: v for k, v in record.items() if k not in columns.values()}
    out.update({name: record[col] for name, col in columns.items()})
    return out


def _arrow_rows(batch) -> list[dict]:
    """The batch's rows as Python values: nulls dropped, and JSON-typed values (`datasets`
    stores lists of differently keyed objects as the `arrow.json` extension type) parsed."""
    rows = batch.to_pylist()
    for name, typ in zip(batch.schema.names, batch.schema.types):
        if _has_json(typ):
            for r in rows:
                r[name] = _parse_json(r[name], typ)
    return [_drop_nulls(r) for r in rows]


def _has_json(typ) -> bool:
    if getattr(typ, "extension_name", None) == "arrow.json":
        return True
    return any(_has_json(typ.field(i).type) for i in range(typ.num_fields))


def _parse_json(value: Any, typ) -> Any:
    if value is None:
        return None
    if getattr(typ, "extension_name", None) == "arrow.json":
        return json.loads(value)
    if isinstance(value, list):  # list types: one child, the item type
        return [_parse_json(v, typ.field(0).type) for v in value]
    if isinstance(value, dict):
        return {k: _parse_json(v, typ.field(k).type) for k, v in value.items()}
    return value


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _json_chunks(src: Source) -> Iterator[Chunk]:
    with open(src.path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        f.seek(0)
        if head.startswith(b"["):
            yield from _json_array_chunks(f, src)
            return
        lines, first = [], 1
        for n, line in enumerate(f, 1):
            if line.strip():
                if not lines:
                    first = n
                lines.append(line)
                if len(lines) == CHUNK:
                    yield Chunk(src.path, first, "lines", lines, src.columns)
                    lines = []
            elif lines:  # a blank line: keep line numbers consecutive within a chunk
                yield Chunk(src.path, first, "lines", lines, src.columns)
                lines = []
        if lines:
            yield Chunk(src.path, first, "lines", lines, src.columns)


def _json_array_chunks(f, src: Source) -> Iterator[Chunk]:
    """A JSON array decoded value by value from a sliding text window."""
    import codecs

    decoder, reader = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8-sig")()
    buf, pos, line, index, records, eof = "", 0, 1, 0, [], False

    def more() -> bool:
        nonlocal buf, pos, line, eof
        block = f.read(1 << 20)
        eof = not block
        try:
            text = reader.decode(block, final=eof)
        except UnicodeDecodeError as e:
            raise DataError(src.path, f"not UTF-8 text ({e.reason})", "not UTF-8") from None
        line += buf.count("\n", 0, pos)
        buf, pos = buf[pos:] + text, 0
        return not eof

    def skip_ws() -> None:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or not more():
                return

    more()
    skip_ws()
    pos += 1  # the "["
    skip_ws()
    if buf[pos:pos + 1] == "]":
        return
    while True:
        while True:
            try:
                value, end = decoder.raw_decode(buf, pos)
                if end == len(buf) and not eof:  # a number may continue in the next block
                    raise json.JSONDecodeError("truncated", buf, end)
                break
            except json.JSONDecodeError as e:
                if eof or not more():
                    where = f"{src.path}:{line + buf.count(chr(10), 0, e.pos)}"
                    raise DataError(where, f"invalid JSON: {e.msg}", "invalid JSON") from None
        records.append(value)
        pos = end
        index += 1
        if len(records) == CHUNK:
            yield Chunk(src.path, index - CHUNK, "records", records, src.columns)
            records = []
        skip_ws()
        sep = buf[pos:pos + 1]
        pos += 1
        if sep == "]":
            break
        if sep != ",":
            where = f"{src.path}:{line + buf.count(chr(10), 0, pos)}"
            raise DataError(where, "invalid JSON: expected ',' or ']' after a record",
                            "invalid JSON")
        skip_ws()
    if records:
        yield Chunk(src.path, index - len(records), "records", records, src.columns)


def _arrow_chunks(src: Source, kind: str) -> Iterator[Chunk]:
    import pyarrow as pa

    try:
        batches, names = _arrow_batches(src, kind)
        missing = [c for c in src.columns.values() if c not in names]
        if missing:
            raise DataError(src.path, f"no column {missing[0]!r} (mapped by columns); the "
                            f"columns are {', '.join(names)}", "missing column")
        row = 0
        for batch in batches:
            for start in range(0, batch.num_rows, CHUNK):
                part = batch.slice(start, CHUNK)
                yield Chunk(src.path, row, "arrow", part, src.columns)
                row += part.num_rows
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        what = {"parquet": "Parquet", "arrow": "Arrow"}.get(kind, "datasets")
        raise DataError(src.path, f"not a readable {what} file ({str(e).splitlines()[0]})",
                        "corrupt file") from None


def _arrow_batches(src: Source, kind: str):
    """(iterator of RecordBatches, column names) of a Parquet, Arrow or datasets source."""
    import pyarrow as pa

    if kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(src.path)
        return pf.iter_batches(batch_size=8 * CHUNK), pf.schema_arrow.names
    if kind == "arrow":
        source = pa.memory_map(src.path)
        try:
            reader = pa.ipc.open_file(source)
            return (reader.get_batch(i) for i in range(reader.num_record_batches)), \
                reader.schema.names
        except pa.ArrowInvalid:  # not the file format: the stream format (datasets writes it)
            reader = pa.ipc.open_stream(pa.memory_map(src.path))
            return iter(reader), reader.schema.names
    import datasets

    try:
        ds = datasets.load_from_disk(src.path)
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as e:
        raise DataError(src.path, f"not a readable datasets folder ({e})",
                        "corrupt file") from None
    if isinstance(ds, datasets.DatasetDict):
        split = src.split or "train"
        if split not in ds:
            raise DataError(src.path, f"no split {split!r} (splits: {', '.join(ds)}); set "
                            "split in the data entry", "bad split")
        ds = ds[split]
    elif src.split:
        raise DataError(src.path, f"split {src.split!r} given, but the folder holds one "
                        "Dataset, not a DatasetDict", "bad split")
    # Memory-mapped Arrow (save_to_disk has already applied any select/shuffle indices).
    return iter(ds.data.table.to_batches(max_chunksize=8 * CHUNK)), ds.column_names
