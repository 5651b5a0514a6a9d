"""`pesc train` / `pesc eval` end to end on a tiny real job, launched as users launch them
(torchrun, gloo, CPU): bit-exact resume after SIGKILL, a kill during a checkpoint write,
resume at another layout, eval parity across layouts, packing, and a two-"node" launch."""
import json
import shutil
import subprocess
import sys

import psutil
import pytest
import torch

from pesc_megatron.parallel.distributed import free_port
from tests.helpers import tiny
from tests.helpers.tiny import ENV, ROOT, evaluate, history, torchrun, train

# Every test here starts processes (torchrun, torch.multiprocessing).
pytestmark = pytest.mark.multiprocess

@pytest.fixture(scope="module")
def job(tmp_path_factory, single_rank):
    root = tmp_path_factory.mktemp("train")
    ckpt, config = tiny.make_job(root, 96, parallel={"ep": 2},
                                 train={"iters": 8, "save_interval": 4,
                                        "out_dir": str(root / "unused")})
    return root, ckpt, config


@pytest.fixture(scope="module")
def reference(job):
    """An uninterrupted EP=2 run of 8 steps with adapter dropout 0.1 (step 3 profiled)."""
    root, _, config = job
    train(2, config, f"train.out_dir={root / 'ref'}", "train.profile_step=3")
    return root / "ref"


def test_sigkill_between_checkpoints_resumes_bit_exact(job, reference):
    root, _, config = job
    out = root / "killed"
    proc = torchrun(2, "-m", "pesc_megatron.cli", "train", str(config),
                    f"train.out_dir={out}", popen=True)
    latest = out / "checkpoints" / "latest"
    tiny.wait_for(proc, lambda: latest.is_file() and latest.read_text().strip() == "iter_0000004")
    tiny.kill_tree(proc)
    assert not (out / "checkpoints" / "iter_0000008").exists()
    run = train(2, config, f"train.out_dir={out}")
    assert "resumed from" in run.stdout and "at step 4" in run.stdout
    got, want = history(out), history(reference)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr"):
            assert got[step][key] == want[step][key], (step, key)


def test_parquet_and_preprocessed_store_train_as_the_jsonl(job, reference, tmp_path):
    """The reference run again, its train set read from Parquet by 2 tokenising workers and its
    valid set from a `pesc preprocess` store: every loss equal to the JSONL run's."""
    import datasets

    from pesc_megatron.cli import preprocess

    root, ckpt, config = job
    datasets.Dataset.from_json(str(root / "train.jsonl")).to_parquet(str(tmp_path / "t.parquet"))
    assert preprocess.main(["--input", str(root / "valid.jsonl"), "--tokenizer", str(ckpt),
                            "--output", str(tmp_path / "valid")]) == 0
    out = tmp_path / "run"
    train(2, config, f"train.out_dir={out}", "train.profile_step=3", "data.num_workers=2",
          f"data.train=[{tmp_path / 't.parquet'}]", f"data.valid=[{tmp_path / 'valid'}]")
    rows = lambda d: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    keys = ("step", "loss", "lm_loss", "aux_loss", "grad_norm", "valid_loss", "valid_tokens")
    got, want = ([{k: r[k] for k in keys if k in r} for r in rows(d)] for d in (out, reference))
    assert got == want and any("valid_loss" in r for r in got)


def test_kill_during_checkpoint_write_keeps_previous(job, reference):
    root, _, config = job
    out = root / "killed_in_save"
    log = root / "killed_in_save.log"
    with open(log, "w") as f:
        rc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
             str(ROOT / "tests" / "helpers" / "kill_in_save.py"), str(config),
             f"train.out_dir={out}"], env=ENV, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
            timeout=600).returncode
    # The killed rank's checkpoint-writer processes outlive it, as they would in a real crash.
    for p in psutil.process_iter(["cmdline"]):
        if str(out) in " ".join(p.info["cmdline"] or []):
            p.kill()
    assert rc != 0, log.read_text()[-3000:]
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "iter_0000004"
    assert list(checkpoints.glob(".iter_0000008.partial-*"))  # the write that was cut short
    assert not (checkpoints / "iter_0000008").exists()
    # The previous checkpoint loads: a rerun resumes from it and cleans the partial folder.
    run = train(2, config, f"train.out_dir={out}")
    assert "at step 4" in run.stdout and not list(checkpoints.glob(".iter_*"))
    assert history(out)[8]["loss"] == history(reference)[8]["loss"]


@pytest.fixture(scope="module")
def no_dropout(job):
    """EP=2, 8 steps, adapter dropout off (so other layouts compute the same function)."""
    root, _, config = job
    out = root / "no_dropout"
    train(2, config, f"train.out_dir={out}", "pesc.adapter_dropout=0.0")
    return out


def test_resume_at_other_layout(job, no_dropout):
    """The EP=2 run's step-4 checkpoint resumed at TP=2 (SP) continues the same training."""
    root, _, config = job
    out = root / "resharded"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(no_dropout / "checkpoints" / "iter_0000004",
                    out / "checkpoints" / "iter_0000004")
    (out / "checkpoints" / "latest").write_text("iter_0000004\n")
    run = train(2, config, f"train.out_dir={out}", "pesc.adapter_dropout=0.0", "parallel.ep=1",
                "parallel.tp=2")
    assert "tp 2" in run.stdout and "at step 4" in run.stdout
    got, want = history(out), history(no_dropout)
    for step in range(5, 9):
        for key in ("lm_loss", "aux_loss", "grad_norm"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-5), (step, key)


def test_eval_same_loss_at_every_layout(job, no_dropout):
    root, _, _ = job
    valid = root / "valid.jsonl"
    single = evaluate(1, no_dropout, valid)
    assert single["records"] == 16 and single["tokens"] > 0
    # The training run validated the base (step 0) and the final model on the same data.
    valid_rows = [json.loads(r) for r in (no_dropout / "metrics.jsonl").read_text()
                  .splitlines() if "valid_loss" in r]
    assert single["loss"] == pytest.approx(valid_rows[-1]["valid_loss"], rel=1e-5)
    assert abs(valid_rows[0]["valid_loss"] - single["loss"]) > 1e-3  # training moved it
    for flags in (("--ep", "2"), ("--tp", "2")):
        other = evaluate(2, no_dropout, valid, *flags)
        assert other["tokens"] == single["tokens"] and other["records"] == 16
        assert other["loss"] == pytest.approx(single["loss"], rel=1e-5), flags


def test_training_checkpoint_is_small_and_points_to_base(job, reference):
    """It stores the routers, the adapters and their two Adam moments, nothing frozen."""
    from megatron.core.dist_checkpointing import load_tensors_metadata

    root, ckpt, _ = job
    trained = reference / "checkpoints" / "iter_0000008"
    state = json.loads((trained / "train_state.json").read_text())
    # the base, relative to the run folder (a run moved with its base resumes) and absolute
    assert (reference / state["base"]).resolve() == ckpt.resolve()
    assert state["base_absolute"] == str(ckpt.resolve()) and state["iteration"] == 8
    assert (reference / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "8\n"
    assert state["consumed_samples"] == 64
    stored = {k: v.global_shape for k, v in load_tensors_metadata(
        str(trained / "weights")).items()}
    base = {k: v.global_shape for k, v in load_tensors_metadata(str(ckpt / "weights")).items()}
    weights = {k for k in base if ".mlp.router." in k or ".mlp.experts." in k}
    assert set(stored) == weights | {f"optimizer.state.{m}.{k}" for k in weights
                                     for m in ("exp_avg", "exp_avg_sq")}
    numel = lambda shapes: sum(torch.Size(s).numel() for s in shapes)  # noqa: E731
    assert numel(stored.values()) == 3 * numel(base[k] for k in weights)
    assert numel(stored.values()) < 0.5 * numel(base.values())
    assert sorted(p.name for p in (reference / "checkpoints").glob("iter_*")) == [
        "iter_0000004", "iter_0000008"]


def test_metrics_and_tensorboard(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "lm_loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 9))
    for r in train_rows:
        assert r["tokens_per_s"] > 0 and r["step_time_s"] > 0 and r["expert_imbalance"] >= 1
        assert r["loss"] == pytest.approx(r["lm_loss"] + r["aux_loss"])
        # per layer (2) each expert's (4) share of the interval's routed tokens
        assert [len(layer) for layer in r["expert_load"]] == [4, 4]
        for layer in r["expert_load"]:
            assert sum(layer) == pytest.approx(1.0, abs=1e-5) and min(layer) >= 0
        busiest = [max(layer) * 4 for layer in r["expert_load"]]  # the loop's own statistic
        assert sum(busiest) / 2 == pytest.approx(r["expert_imbalance"], abs=1e-5)
    assert [r["step"] for r in rows if "valid_loss" in r] == [0, 8]
    tb = EventAccumulator(str(reference / "tb"))
    tb.Reload()
    tags = set(tb.Tags()["scalars"])
    assert {"train/lm_loss", "train/grad_norm", "valid_loss", "expert_imbalance/layer_01",
            "expert_load/layer_02/expert_3"} <= tags
    loads = [tb.Scalars(f"expert_load/layer_01/expert_{e}")[-1].value for e in range(4)]
    assert sum(loads) == pytest.approx(1.0, abs=1e-5)
    assert loads == pytest.approx(train_rows[-1]["expert_load"][0], abs=1e-6)


def test_profile_step_writes_a_trace_and_a_table_per_rank(reference):
    profile = reference / "profile"
    assert sorted(p.name for p in profile.iterdir()) == [
        "step3_rank0.json", "step3_rank0.txt", "step3_rank1.json", "step3_rank1.txt"]
    for rank in (0, 1):
        table = (profile / f"step3_rank{rank}.txt").read_text()
        assert table.startswith("step 3: wall ") and "aten::mm" in table
        trace = json.loads((profile / f"step3_rank{rank}.json").read_text())
        assert any(e.get("name") == "aten::mm" for e in trace["traceEvents"])


def test_resume_refuses_a_changed_data_order(job, reference):
    root, _, config = job
    run = subprocess.run([sys.executable, "-m", "pesc_megatron.cli", "train", str(config),
                          f"train.out_dir={reference}", "train.global_batch_size=4",
                          "parallel.ep=1"], env=ENV, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith(
        "pesc train: error: train.global_batch_size=4: ")


def test_two_node_launch_matches_one_node(job):
    """Two launcher invocations (NNODES=2, 2 ranks each) form one 4-rank job (EP=2, i.e. two
    expert-data-parallel groups; dense DP=4) that trains to the same losses as one 4-rank
    launch, with the distributed optimizer, each node building its own node-local token cache."""
    root, _, config = job
    args = ["train", str(config), "parallel.ep=2", "train.iters=3", "train.save_interval=0",
            "optim.distributed=true"]
    one = root / "one_node"
    one_run = subprocess.run(["launch/torchrun.sh", *args, f"train.out_dir={one}"], cwd=ROOT,
                             env=dict(ENV, GPUS_PER_NODE="4", MASTER_PORT=str(free_port())),
                             capture_output=True, text=True, timeout=600)
    assert one_run.returncode == 0, one_run.stderr[-3000:]
    two = root / "two_nodes"
    port = str(free_port())
    nodes = [subprocess.Popen(  # each node with a node-local token cache of its own
        ["launch/torchrun.sh", *args, f"train.out_dir={two}",
         f"data.cache_dir={root / f'local_cache_{rank}'}"], cwd=ROOT, env=dict(
            ENV, NNODES="2", NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
            GPUS_PER_NODE="2"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)]
    outputs = [n.communicate(timeout=600)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), outputs[0][-3000:] + outputs[1][-3000:]
    assert "world 4 (tp 1, pp 1, ep 2, dp 4)" in outputs[0]
    assert all(len(list((root / f"local_cache_{r}").glob("*/store.json"))) == 2 for r in (0, 1))
    got, want = history(two), history(one)
    assert sorted(got) == [1, 2, 3]
    for step in got:
        assert got[step]["loss"] == want[step]["loss"]
        assert got[step]["tokens_per_s"] > 0


@pytest.mark.parametrize("attention", ["sdpa", "local"])
def test_packing_gives_unpacked_per_sample_loss(job, attention):
    """Through the real model (non-zero adapters, GQA): each sample's token losses are the same
    packed (THD boundaries, RoPE restarted per sample) as alone in its own sequence."""
    from pesc_megatron.checkpoint import base as checkpoint
    from pesc_megatron.data import build_dataset, collate, load_tokenizer
    from pesc_megatron.parallel.config import ParallelConfig
    from pesc_megatron.train.step import model_inputs

    root, ckpt, _ = job
    model, _ = checkpoint.load(ckpt, ParallelConfig(), attention=attention)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "linear_fc2" in name and ".experts." in name:
                p.normal_(0, 0.5)
    model.eval()
    tok = load_tokenizer(ckpt)
    files = [root / "valid.jsonl"]
    packed = build_dataset(files, tok, seq_length=64, packing=True, seed=3)
    plain = build_dataset(files, tok, seq_length=64, packing=False, seed=3)
    assert len(packed) < len(plain)

    def token_losses(item):
        b = model_inputs(collate([item]), thd=attention != "local")
        with torch.no_grad():
            return model(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["labels"],
                         packed_seq_params=b["packed_seq_params"])[0] * b["loss_mask"][0]

    checked = 0
    for i in range(len(packed)):
        losses, bounds = token_losses(packed[i]), packed.sample_boundaries(i)
        for j, k in enumerate(packed.bins[i]):
            alone = token_losses(plain[k])
            n = bounds[j + 1] - bounds[j]
            torch.testing.assert_close(losses[bounds[j]:bounds[j + 1]], alone[:n],
                                       rtol=1e-5, atol=1e-5)
            checked += 1
    assert checked == 16


def test_export_of_a_training_checkpoint(job, reference, tmp_path):
    """`pesc convert pesc-to-hf` on the run folder writes the trained routers and adapters."""
    from safetensors.torch import load_file

    from pesc_megatron.checkpoint import base as checkpoint
    from pesc_megatron.interop.pesc_to_hf import export
    from pesc_megatron.parallel.config import ParallelConfig

    root, ckpt, _ = job
    out = export(reference, tmp_path / "hf")
    tensors = {}
    for f in out.glob("*.safetensors"):
        tensors.update(load_file(f))
    model, info = checkpoint.load(reference, ParallelConfig())
    assert info.trained.name == "iter_0000008"
    state = model.state_dict()
    up = tensors["model.layers.1.mlp.moe_adapter.experts.expert_2.adapter_up.weight"]
    assert torch.count_nonzero(up) > 0  # trained (a fresh adapter's up projection is zero)
    assert torch.equal(up, state["decoder.layers.1.mlp.experts.local_experts.2.linear_fc2"
                                 ".weight"])
    assert torch.equal(tensors["model.layers.0.mlp.moe_adapter.router.weight"],
                       state["decoder.layers.0.mlp.router.weight"])
    assert (out / "tokenizer.json").is_file()  # from the base checkpoint
