"""The low-precision frozen bases in parallel layouts (gloo): each rank's shard of the FP8
linears' forward and input gradient is within e4m3's rounding of the float64 product, and of
the NF4 linears equal to the product with the dequantized shard (with and without exact
columns), at TP=2 + SP, and the loader's exact columns equal to the checkpoint's shard (TP=2,
PP=2); `pesc train` / `pesc eval` with `precision.frozen_weights=fp8` at TP=2 end to end, and `pesc eval` at PP=2
against one rank; `pesc train` (with LoRA) and `pesc eval` on an NF4 base at EP=2."""
import json

import pytest

from tests.helpers import tiny
from tests.helpers.quantized_check import loaded_exact_columns_worker, tp_worker
from tests.helpers.tiny import evaluate, train
from tests.helpers.workers import spawn

# Every test here starts processes (torchrun, torch.multiprocessing).
pytestmark = pytest.mark.multiprocess


def test_frozen_linears_tp2():
    spawn(tp_worker, 2)


def test_nf4_linears_keep_their_exact_columns_tp2_pp2(tmp_path):
    spawn(loaded_exact_columns_worker, 2, str(tiny.make_checkpoint(tmp_path)))


def train_on_a_low_precision_base(tmp_path, frozen: str, **sections):
    """Four steps of `pesc train` on the tiny model over a `frozen` base (2 ranks); returns
    the run folder, the validation file and the validation rows (steps 0 and 4)."""
    ckpt = tiny.make_checkpoint(tmp_path)
    tiny.write_jsonl(tmp_path / "train.jsonl", tiny.records(32, 1))
    valid = tiny.write_jsonl(tmp_path / "valid.jsonl", tiny.records(16, 2))
    out = tmp_path / "out"
    config = tiny.write_job(tmp_path / "job.yaml", ckpt, tmp_path, out, train={"iters": 4},
                            pesc={"adapter_dropout": 0.0}, **sections)
    run = train(2, config, f"precision.frozen_weights={frozen}")
    assert "frozen weights on this rank: " in run.stdout and "of bf16)" in run.stdout
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()
            if "valid_loss" in r]
    assert [r["step"] for r in rows] == [0, 4] and rows[1]["valid_loss"] < rows[0]["valid_loss"]
    return out, valid, rows


def test_train_and_eval_on_an_fp8_base_tp2(tmp_path, single_rank):
    out, valid, rows = train_on_a_low_precision_base(tmp_path, "fp8", parallel={"tp": 2})
    # `pesc eval` of the run on an FP8 base at the run's layout is its final validation.
    fp8 = evaluate(2, out, valid, "--tp", "2", "--frozen-weights", "fp8")
    assert fp8["loss"] == pytest.approx(rows[1]["valid_loss"], rel=1e-5)
    # At PP=2 the calibration pass runs through the pipeline schedule and must pick the same
    # 8 of the 32 output-layer columns as one rank does (no weight is split: same rounding).
    flags = ("--frozen-weights", "fp8", "--output-outliers", "8")
    one, pp2 = evaluate(1, out, valid, *flags), evaluate(2, out, valid, "--pp", "2", *flags)
    assert pp2["loss"] == pytest.approx(one["loss"], rel=1e-6)


def test_train_and_eval_on_an_nf4_base_ep2(tmp_path, single_rank):
    out, valid, rows = train_on_a_low_precision_base(
        tmp_path, "nf4", parallel={"ep": 2},
        lora={"targets": ["q_proj", "down_proj"], "rank": 4, "dropout": 0.0})
    # `pesc eval` of the run on an NF4 base at the run's layout is its final validation, and
    # one rank gives the same (no weight is split at EP=2: the same rounding).
    nf4 = evaluate(2, out, valid, "--ep", "2", "--frozen-weights", "nf4")
    assert nf4["loss"] == pytest.approx(rows[1]["valid_loss"], rel=1e-5)
    one = evaluate(1, out, valid, "--frozen-weights", "nf4")
    assert one["loss"] == pytest.approx(nf4["loss"], rel=1e-5)
