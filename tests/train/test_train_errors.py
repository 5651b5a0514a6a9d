"""`pesc train` jobs: YAML + overrides, the LR schedules, and every user error as one line
with exit code 2 (config errors before any work; data errors from a real run)."""
import math
import subprocess
import sys

import pytest

from pesc_megatron.cli import main
from pesc_megatron.schema import ConfigError
from pesc_megatron.train.config import apply_overrides, load_job
from tests.helpers import tiny


@pytest.fixture(scope="module")
def setup(tmp_path_factory, single_rank):
    root = tmp_path_factory.mktemp("errors")
    ckpt = tiny.make_checkpoint(root, layers=1)
    tiny.write_jsonl(root / "train.jsonl", tiny.records(8, 1))
    tiny.write_jsonl(root / "valid.jsonl", tiny.records(4, 2))
    return root, ckpt


def job_file(setup, name="job.yaml", **sections):
    root, ckpt = setup
    return tiny.write_job(root / name, ckpt, root, root / "out", **sections)


def test_overrides_and_yaml_types(setup):
    job = load_job(str(job_file(setup)), ["optim.lr=3e-4", "train.iters=5", "data.packing=false",
                                          "pesc.adapter_dropout=0", "data.train=[a.jsonl]"])
    assert (job.optim.lr, job.train.iters, job.data.packing) == (3e-4, 5, False)
    assert job.pesc == {"adapter_dropout": 0} and job.data.train == ["a.jsonl"]
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["optim.lr"])


@pytest.mark.parametrize("overrides,message", [
    (["train.epochs=2"], r"job.yaml: train.epochs: unknown option \(known: .*iters"),
    (["optimizer.lr=1"], r"job.yaml: optimizer: unknown section"),
    (["optim.lr=fast"], r"job.yaml: optim.lr: expected float, got 'fast'"),
    (["pesc.num_experts=4"], r"pesc.num_experts: not a training-time option"),
    (["optim.schedule=step"], r"optim.schedule='step': must be one of constant_with_warmup"),
    (["train.global_batch_size=7"], r"train.global_batch_size=7: is not divisible by "
                                    r"train.micro_batch_size=2"),
    (["model.checkpoint=''"], r"job.yaml: model.checkpoint: required"),
    (["parallel.tp=3", "data.seq_length=64"], r"data.seq_length=64: is not divisible by "
                                              r"parallel.tp=3 \(sequence parallelism"),
    (["data.loss_on=turns"], r"data.loss_on='turns': must be one of assistant, last, all"),
    (["data.num_workers=0"], r"data.num_workers=0: must be >= 1"),
    (["data.chat_template=/nope.jinja"], r"data.chat_template='/nope.jinja': is not a file"),
    (["data.train=[{path: a.parquet, colums: {}}]"], r"data.train\[0\]=.*: expected a path or "
                                                     r"\{columns, path, split, weight\}"),
    (["data.valid=[{path: a.jsonl, weight: 2}]"], r"data.valid\[0\]=.*: expected a path or "
                                                  r"\{columns, path, split\}"),
])
def test_config_errors(setup, overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_job(str(job_file(setup)), overrides)
    assert "\n" not in str(e.value)


def run_cli(capsys, *argv) -> tuple[int, str]:
    rc = main(["train", *map(str, argv)])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err[-1] if err else ""


@pytest.mark.parametrize("override,message", [
    ("train.max_skipped_steps=0", "train.max_skipped_steps=0: must be >= 1"),
    ("train.per_token_loss=sometimes", "train.per_token_loss: expected bool, got 'sometimes'"),
    ("train.async_save=2", "train.async_save: expected bool, got 2"),
])
def test_the_trustworthy_training_keys_are_checked(setup, capsys, override, message):
    """The keys of the loss, non-finite guard and background saves: one line, exit code 2."""
    rc, line = run_cli(capsys, job_file(setup), override)
    assert rc == 2 and line.endswith(message), line


def test_cli_errors_before_any_work(setup, capsys, monkeypatch, tmp_path):
    config = job_file(setup)
    rc, line = run_cli(capsys, config, "train.bogus=1")
    assert rc == 2 and line.startswith("pesc train: error: ") and "train.bogus: unknown" in line
    # global batch 8 = micro-batch 2 x 4 data-parallel ranks x 1 per step; 3 ranks cannot.
    monkeypatch.setenv("WORLD_SIZE", "3")
    rc, line = run_cli(capsys, config, "train.global_batch_size=8")
    assert rc == 2 and ("train.global_batch_size=8 is not divisible by "
                        "train.micro_batch_size*data-parallel size=2*3") in line
    monkeypatch.delenv("WORLD_SIZE")
    not_ckpt = tmp_path / "not_a_checkpoint"
    not_ckpt.mkdir()
    rc, line = run_cli(capsys, config, f"model.checkpoint={not_ckpt}")
    assert rc == 2 and f"{not_ckpt}: not a pesc-megatron checkpoint" in line
    (tmp_path / "bad.yaml").write_text("train: {iters: 3\n")
    rc, line = run_cli(capsys, tmp_path / "bad.yaml")
    assert rc == 2 and "bad.yaml" in line and "invalid YAML" in line
    with pytest.raises(SystemExit) as e:  # pesc eval: argparse's exit
        main(["eval", "--ckpt", str(not_ckpt), "--data", "x.jsonl", "--tp", "3"])
    assert e.value.code == 2 and ("--seq-length 1024 is not divisible by --tp 3"
                                  in capsys.readouterr().err)


def test_attention_this_machine_cannot_run_is_one_line(setup, capsys):
    """No Transformer Engine on a CPU machine: model.attention=te (and pesc eval --attention te)
    is one line naming the key, the value and what is available."""
    config = job_file(setup)
    rc, line = run_cli(capsys, config, "model.attention=te")
    assert rc == 2 and line.startswith("pesc train: error: ")
    assert "model.attention=te: not available on this machine" in line
    assert "available: auto, sdpa, local" in line
    rc, line = run_cli(capsys, config, "model.attention=flash")
    assert rc == 2 and "model.attention='flash': must be one of auto, sdpa, local, te" in line
    rc, line = run_cli(capsys, config, "model.experts=loop")
    assert rc == 2 and "model.experts='loop': must be one of grouped, sequential" in line
    rc = main(["eval", "--ckpt", str(setup[1]), "--data", "x.jsonl", "--attention", "te"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "--attention=te: not available on this machine" in line


@pytest.mark.multiprocess
def test_data_errors_stop_the_run(setup):
    """A missing file, malformed JSON, and records with no trainable token: three real runs
    (launched together to share the start-up time)."""
    root, _ = setup
    (root / "malformed.jsonl").write_text('{"text": "cat dog"}\n{"text": "cat\n')
    tiny.write_jsonl(root / "empty_targets.jsonl", [
        {"instruction": "what is cat", "input": "", "output": ""},
        {"messages": [{"role": "user", "content": "what is dog"},
                      {"role": "assistant", "content": ""}]}])
    cases = {"nope.jsonl": "{}: data file not found", "malformed.jsonl": "{}:2: ",
             "empty_targets.jsonl": "no sample with a trainable token"}
    runs = {}
    for name in cases:
        config = job_file(setup, f"job_{name}.yaml", data={"train": [str(root / name)]},
                          train={"out_dir": str(root / f"out_{name}")})
        runs[name] = subprocess.Popen(
            [sys.executable, "-m", "pesc_megatron.cli", "train", str(config)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, expected in cases.items():
        _, err = runs[name].communicate(timeout=300)
        last = err.strip().splitlines()[-1]
        assert runs[name].returncode == 2, err[-2000:]
        assert last.startswith("pesc train: error: ") and expected.format(root / name) in last
        assert not (root / f"out_{name}" / "checkpoints").exists()


def test_schedules(setup):
    """megatron-core's scheduler as configured: lr of optimizer step n (1-based)."""
    from pesc_megatron.train.optim import build_scheduler

    class Opt:
        param_groups = [{}]

    def lrs(schedule, iters=10, warmup=4):
        job = load_job(str(job_file(setup)), [f"optim.schedule={schedule}", "optim.lr=1.0",
                                              "optim.min_lr=0.1", f"optim.warmup_steps={warmup}"])
        sched, out = build_scheduler(Opt(), job.optim, iters), []
        for _ in range(iters):
            out.append(Opt.param_groups[0]["lr"])
            sched.step(1)
        return out

    warm = [0.0, 0.25, 0.5, 0.75, 1.0]
    assert lrs("constant_with_warmup") == pytest.approx(warm + [1.0] * 5)
    assert lrs("linear") == pytest.approx(warm + [1 - 0.9 * k / 6 for k in range(1, 6)])
    assert lrs("cosine") == pytest.approx(
        warm + [0.1 + 0.45 * (1 + math.cos(math.pi * k / 6)) for k in range(1, 6)])
