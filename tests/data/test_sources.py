"""Sources and the token store: Parquet, Arrow, `datasets` folders and JSON arrays written from a
JSONL file give exactly its dataset; column mapping; corrupt files; stores written by
`pesc preprocess` and by N workers; nothing half-written."""
import json
import subprocess
import sys

import numpy as np
import pytest

from pesc_megatron.data import DataError, TokenStore, build_dataset, load_tokenizer
from pesc_megatron.data.store import FileArray
from tests.conftest import needs_smollm2
from tests.data.conftest import write_jsonl
from tests.helpers.tiny import ROOT

QUICKSTART = ROOT / "examples" / "data" / "quickstart_train.jsonl"  # all four older formats


def same_dataset(a, b):
    assert a.stats == b.stats and np.array_equal(a.samples, b.samples)
    assert len(a) == len(b)
    for sa, sb in zip(a.stores, b.stores):
        assert np.array_equal(sa.ids, sb.ids) and np.array_equal(sa.mask, sb.mask)
        assert np.array_equal(sa.offsets, sb.offsets)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The quickstart JSONL plus ShareGPT records with tool calls, as datasets writes them."""
    import datasets
    import pyarrow as pa

    d = tmp_path_factory.mktemp("sources")
    records = [json.loads(line) for line in QUICKSTART.read_text().splitlines()]
    records += [{"conversations": [{"from": "human", "value": f"q{i}"},
                                   {"from": "gpt", "value": f"a{i}", "weight": i % 2}]}
                for i in range(20)]
    jsonl = write_jsonl(d / "mix.jsonl", records)
    ds = datasets.Dataset.from_json(str(jsonl))
    ds.to_parquet(str(d / "mix.parquet"))
    ds.save_to_disk(str(d / "folder"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(10))}).save_to_disk(
        str(d / "dict"))
    with pa.OSFile(str(d / "mix.arrow"), "wb") as f:  # the IPC file format (datasets: stream)
        with pa.ipc.new_file(f, ds.data.table.schema) as w:
            w.write_table(ds.data.table)
    (d / "mix.json").write_text(json.dumps(records, indent=1))  # one array, pretty-printed
    return d


@pytest.mark.parametrize("kind", ["sp", pytest.param("hf", marks=needs_smollm2)])
def test_every_source_gives_the_jsonl_dataset(written, kind, request):
    tok = request.getfixturevalue(kind)
    d = written
    want = build_dataset([d / "mix.jsonl"], tok, seq_length=96, packing=True)
    for entry in (d / "mix.parquet", d / "mix.arrow", d / "folder", d / "mix.json",
                  {"path": str(d / "dict"), "split": "train"},
                  next((d / "folder").glob("*.arrow"))):  # datasets' own stream-format file
        got = build_dataset([entry], tok, seq_length=96, packing=True)
        same_dataset(got, want)
    small = build_dataset([{"path": str(d / "dict"), "split": "test"}], tok, seq_length=96)
    assert small.stats.records == 10
    with pytest.raises(DataError, match=r"dict: no split 'valid' \(splits: train, test\)"):
        build_dataset([{"path": str(d / "dict"), "split": "valid"}], tok, seq_length=96)


def test_json_array_streamed_across_blocks(sp, tmp_path):
    records = [{"text": f"cats and dogs {i} " + "more " * 300} for i in range(800)]  # > 1 MiB
    (tmp_path / "big.json").write_text(json.dumps(records))
    assert (tmp_path / "big.json").stat().st_size > 1.1 * 2 ** 20
    same_dataset(build_dataset([tmp_path / "big.json"], sp, seq_length=32),
                 build_dataset([write_jsonl(tmp_path / "big.jsonl", records)], sp, seq_length=32))
    (tmp_path / "cut.json").write_text(json.dumps(records)[:-200])
    with pytest.raises(DataError, match=r"cut.json:1: invalid JSON"):
        build_dataset([tmp_path / "cut.json"], sp, seq_length=32)


def test_column_mapping(sp, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    chat = [{"messages": [{"role": "user", "content": f"hi {i}"},
                          {"role": "assistant", "content": f"yo {i}"}]} for i in range(6)]
    renamed = [{"dialog": r["messages"], "id": i} for i, r in enumerate(chat)]
    want = build_dataset([write_jsonl(tmp_path / "chat.jsonl", chat)], sp, seq_length=128)
    pq.write_table(pa.Table.from_pylist(renamed), tmp_path / "r.parquet")
    for path in (write_jsonl(tmp_path / "r.jsonl", renamed), tmp_path / "r.parquet"):
        got = build_dataset([{"path": str(path), "columns": {"messages": "dialog"}}], sp,
                            seq_length=128)
        same_dataset(got, want)
    with pytest.raises(DataError, match=r"r.jsonl:1: missing mapped column 'talk'"):
        build_dataset([{"path": str(tmp_path / "r.jsonl"), "columns": {"messages": "talk"}}],
                      sp, seq_length=128)
    with pytest.raises(DataError, match=r"r.parquet: no column 'talk' \(mapped by columns\); "
                       "the columns are dialog, id"):
        build_dataset([{"path": str(tmp_path / "r.parquet"), "columns": {"messages": "talk"}}],
                      sp, seq_length=128)


def test_bad_rows_and_corrupt_files(sp, written, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"text": "fine"}, {"txt": "no"}]), tmp_path / "r.parquet")
    with pytest.raises(DataError, match=r"r.parquet:row 1: unknown record format"):
        build_dataset([tmp_path / "r.parquet"], sp, seq_length=32)
    data = (written / "mix.parquet").read_bytes()
    for name, blob in (("garbage.parquet", b"not parquet at all" * 10),
                       ("cut.parquet", data[:len(data) // 2]),
                       ("garbage.arrow", b"\0" * 64)):
        (tmp_path / name).write_bytes(blob)
        what = "Parquet" if name.endswith("parquet") else "Arrow"
        with pytest.raises(DataError, match=rf"{name}: not a readable {what} file"):
            build_dataset([tmp_path / name], sp, seq_length=32, on_error="skip",
                          cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())  # nothing half-written


def test_preprocess_store_is_the_jsonl_dataset(sp, tmp_path):
    from pesc_megatron.cli import preprocess

    f = write_jsonl(tmp_path / "d.jsonl", [{"text": f"cats {i}"} for i in range(30)]
                    + [{"conversations": [{"from": "human", "value": "q"},
                                          {"from": "gpt", "value": "a"}]}])
    out = tmp_path / "store"
    assert preprocess.main(["--input", str(f), "--tokenizer", str(sp.path), "--output",
                            str(out)]) == 0
    store = TokenStore.open(out)
    assert store.meta["records"] == 31 and isinstance(store.ids, FileArray)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "store"]
    same_dataset(build_dataset([out], sp, seq_length=16, packing=True, cache_dir=tmp_path / "c"),
                 build_dataset([f], sp, seq_length=16, packing=True))
    with pytest.raises(DataError, match=r"store: tokenised with loss_on 'assistant', but "
                       r"data.loss_on is 'all'"):
        build_dataset([out], sp, seq_length=16, loss_on="all")


@needs_smollm2
def test_store_of_another_tokenizer_is_refused(sp, smol_folder, tmp_path):
    from pesc_megatron.cli import preprocess

    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "cats"}])
    preprocess.main(["--input", str(f), "--tokenizer", str(sp.path), "--output",
                     str(tmp_path / "store")])
    with pytest.raises(DataError, match="tokenised with another tokenizer"):
        build_dataset([tmp_path / "store"], load_tokenizer(smol_folder), seq_length=16)


@pytest.mark.multiprocess
def test_workers_write_the_same_store(sp, tmp_path):
    records = [{"text": f"cats and dogs {i}"} for i in range(3000)]
    records[1234] = {"oops": 1}
    f = write_jsonl(tmp_path / "d.jsonl", records)
    one = build_dataset([f], sp, seq_length=32, cache_dir=tmp_path / "a", on_error="skip")
    two = build_dataset([f], sp, seq_length=32, cache_dir=tmp_path / "b", on_error="skip",
                        num_workers=2)
    same_dataset(one, two)
    assert two.stats.skipped == {"unknown format": 1}
    with pytest.raises(DataError, match=r"d.jsonl:1235: unknown record format"):
        build_dataset([f], sp, seq_length=32, cache_dir=tmp_path / "c", num_workers=2)
    assert not list((tmp_path / "c").iterdir())


@pytest.mark.multiprocess
def test_workers_end_under_pesc_trains_signal_handlers(sp, tmp_path):
    """`pesc train` records SIGTERM instead of exiting (train/preemption.py) and its tokenising
    workers inherit that: their pool must still end them (multiprocessing.Pool's terminate()
    relies on SIGTERM: with it, 40 builds hung in each of two tries). In a process of its own."""
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": f"cats and dogs {i}"} for i in range(500)])
    script = f"""
from pesc_megatron.data import build_dataset, load_tokenizer
from pesc_megatron.train import preemption
preemption.record_signals()
tok = load_tokenizer({str(sp.path)!r})
sizes = {{len(build_dataset([{str(f)!r}], tok, seq_length=32, num_workers=2)) for _ in range(40)}}
print(sizes)
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "{500}"
