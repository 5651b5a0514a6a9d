"""`pesc eval --tasks` (lm-evaluation-harness on the megatron-core model): the same per-request
results as lm-eval's Hugging Face model on the export at TP=1, EP=2 and TP=3, and at TP=1 as a
hand-written loop (tools/eval_parity.py does the comparing); bad input exits 2 with one line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pesc_megatron import cli
from tests.helpers.tiny import make_byte_tokenizer, make_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TASK = str(ROOT / "examples" / "eval" / "pesc_mc.yaml")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random Llama with a byte-level tokenizer (every task string encodes), shaped to split
    over 3 TP ranks, as a PESC checkpoint and its Hugging Face export."""
    from pesc_megatron.interop.pesc_to_hf import export

    root = tmp_path_factory.mktemp("lm_eval")
    base = make_checkpoint(root, hidden=48, heads=6, kv_heads=3, intermediate=96, vocab=300,
                           pesc=dict(adapter_dim=12), tokenizer=make_byte_tokenizer)
    export(base, root / "export")
    return base, root / "export"


@pytest.mark.multiprocess
def test_pesc_eval_tasks_equal_lm_eval_on_the_export(tiny):
    base, exported = tiny
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "eval_parity.py"), "--ckpt",
                          str(base), "--export", str(exported), "--layouts", "tp1,ep2,tp3",
                          "--limit", "6", "--batch-size", "4"],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode in (0, 1), run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    # 6 documents of each shipped task: 18 choices, 6 generations, 6 texts
    assert report["requests"] == {"pesc_mc": 18, "pesc_gen": 6, "pesc_text": 6}
    runs = report["runs"]
    assert set(runs) == {"lm-eval hf", "pesc tp1", "pesc ep2", "pesc tp3",
                         "pesc tp1 vs hand loop"}
    for name, row in runs.items():
        if name != "lm-eval hf":
            assert row["mismatches"] == [], name
            assert row["max_rel_diff"] <= 1e-4, name
    assert report["ok"]


def pesc_eval(capsys, *args):
    rc = cli.main(["eval", *map(str, args)])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err[-1] if err else ""


def test_unknown_task(capsys, tiny):
    rc, line = pesc_eval(capsys, "--ckpt", tiny[0], "--tasks", f"{TASK},no_such_task_xyz",
                         "--include-path", ROOT / "examples" / "eval")
    assert rc == 2 and line.startswith("pesc eval: error: --tasks: unknown task no_such_task_xyz")


def test_task_file_that_does_not_parse(capsys, tiny, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed\n")
    rc, line = pesc_eval(capsys, "--ckpt", tiny[0], "--tasks", bad)
    assert rc == 2 and line.startswith(f"pesc eval: error: {bad}: not a task file lm-eval "
                                       "can read")
    nameless = tmp_path / "nameless.yaml"
    nameless.write_text("output_type: multiple_choice\n")
    rc, line = pesc_eval(capsys, "--ckpt", tiny[0], "--tasks", nameless)
    assert rc == 2 and line == f"pesc eval: error: {nameless}: a task file needs a `task:` name"


def test_lm_eval_not_installed(capsys, tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` sees uninstalled
    rc, line = pesc_eval(capsys, "--ckpt", tiny[0], "--tasks", TASK)
    assert rc == 2 and line == ("pesc eval: error: lm-eval is not installed: pip install -e "
                                "'.[eval]' (or pip install 'lm_eval>=0.4.13')")


def test_not_a_checkpoint(capsys, tmp_path):
    rc, line = pesc_eval(capsys, "--ckpt", tmp_path, "--tasks", TASK)
    assert rc == 2 and line.startswith(f"pesc eval: error: {tmp_path}") and "checkpoint" in line
