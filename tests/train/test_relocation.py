"""A run folder and its base moved together resume and export; a base moved elsewhere works
with the override (`model.checkpoint` to resume, `--base` for eval and export) and without it
gives one line naming the missing paths (the refusals in detail: tests/checkpoint)."""
import json
import shutil
import subprocess
import sys

import pytest

from tests.helpers import tiny
from tests.helpers.tiny import ENV, ROOT, evaluate, history, train

# Every test here starts processes (torchrun, a CLI subprocess).
pytestmark = pytest.mark.multiprocess


def pesc(*args):
    return subprocess.run([sys.executable, "-m", "pesc_megatron.cli", *map(str, args)],
                          env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step run saved at step 2 (of 4), then its folder and base moved together."""
    root = tmp_path_factory.mktemp("relocate")
    old, data = root / "old", root / "data"
    old.mkdir()
    data.mkdir()
    ckpt = tiny.make_checkpoint(old)
    tiny.write_jsonl(data / "train.jsonl", tiny.records(32, 1))
    tiny.write_jsonl(data / "valid.jsonl", tiny.records(8, 2))
    config = tiny.write_job(root / "job.yaml", ckpt, data, old / "run",
                            train={"iters": 4, "save_interval": 2})
    train(1, config, "train.iters=2")
    new = root / "new"
    shutil.move(old, new)
    return new, new / "base", config


def test_a_run_moved_with_its_base_resumes_and_exports(run):
    new, base, config = run
    out = new / "run"
    resumed = train(1, config, f"model.checkpoint={base}", f"train.out_dir={out}")
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout
    assert sorted(history(out)) == [1, 2, 3, 4]
    exported = pesc("convert", "pesc-to-hf", "--ckpt", out, "--out", new / "export")
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert json.loads((new / "export" / "config.json").read_text())["model_type"] == "camelidae"


def test_a_base_moved_alone_needs_the_override(run):
    new, base, _ = run
    elsewhere = new.parent / "elsewhere"
    shutil.move(base, elsewhere)
    try:
        failed = pesc("convert", "pesc-to-hf", "--ckpt", new / "run", "--out", new / "export2")
        assert failed.returncode == 2
        line = failed.stderr.strip().splitlines()[-1]
        assert "its base checkpoint is missing" in line and str(new / "base") in line
        assert "--base" in line
        exported = pesc("convert", "pesc-to-hf", "--ckpt", new / "run", "--out", new / "export2",
                        "--base", elsewhere)
        assert exported.returncode == 0, exported.stderr[-2000:]
        got = evaluate(1, new / "run", new.parent / "data" / "valid.jsonl", "--base",
                       str(elsewhere))
        assert got["tokens"] > 0
    finally:
        shutil.move(elsewhere, base)
