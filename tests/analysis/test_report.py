"""`pesc report`: metrics.jsonl written by the training loop's own Logger, with synthetic
expert loads whose shares are known, read back and drawn; each user error."""
import json

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from matplotlib.colors import TwoSlopeNorm
from matplotlib.image import imread

from pesc_megatron.analysis import report
from pesc_megatron.analysis.balance import load_imbalance
from pesc_megatron.cli import main as cli_main, report as report_command
from pesc_megatron.schema import ConfigError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = [2, 4, 6, 8, 10, 12]  # log_interval 2
EXPERTS = 4


def expected_shares() -> np.ndarray:
    """[layers=3, experts=4, rows=6]: layer 1 collapses onto expert 2 (share 1/4 -> 0.925),
    layer 2 stays balanced, layer 3 keeps 0.7 on expert 0."""
    shares = np.zeros((3, EXPERTS, len(STEPS)))
    for t in range(len(STEPS)):
        p = 0.9 * t / (len(STEPS) - 1)
        shares[0, :, t] = (1 - p) / EXPERTS
        shares[0, 2, t] += p
    shares[1] = 1 / EXPERTS
    shares[2] = np.array([0.7, 0.1, 0.1, 0.1])[:, None]
    return shares


def write_run(run_dir, with_loads=True):
    from pesc_megatron.train.logger import Logger

    logger = Logger(run_dir, start_step=0)
    logger.write({"step": 0, "valid_loss": 3.0, "valid_tokens": 100})
    # routed-token counts with a different total per layer: the Logger turns them into shares
    totals = torch.tensor([[1000.0], [96.0], [3.0]], dtype=torch.float64)
    for t, step in enumerate(STEPS):
        lm, aux = 3.0 - 0.2 * t, 0.01 + 0.001 * t
        row = dict(step=step, loss=lm + aux, lm_loss=lm, aux_loss=aux, lr=1e-3 * step / 12,
                   grad_norm=1.0 / (t + 1), tokens_per_s=100.0, step_time_s=1.0,
                   expert_imbalance=1.5, balance=1.0)
        load = torch.from_numpy(expected_shares()[:, :, t]) * totals
        logger.write(row, load if with_loads else None)
    logger.write({"step": STEPS[-1], "valid_loss": 1.5, "valid_tokens": 100})
    logger.close()
    return run_dir


@pytest.fixture
def run(single_rank, tmp_path):
    return write_run(tmp_path / "run")


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_logger_rows_hold_each_layers_shares(run):
    train, valid = report.read_metrics(run)
    assert [r["step"] for r in train] == STEPS
    assert [r["step"] for r in valid] == [0, STEPS[-1]]
    for row in train:
        assert np.asarray(row["expert_load"]).shape == (3, EXPERTS)
        assert np.sum(row["expert_load"], axis=1) == pytest.approx([1, 1, 1], abs=1e-5)
    matrix = report.load_matrix(train)
    np.testing.assert_allclose(matrix, expected_shares(), atol=1e-6)
    np.testing.assert_allclose(load_imbalance(matrix)[:, -1], [0.925 * 4, 1.0, 0.7 * 4],
                               atol=1e-5)
    np.testing.assert_array_equal(report.step_edges(train, train), [0] + STEPS)


def pixels_near(image: np.ndarray, rgb, tol=0.02) -> int:
    return int((np.abs(image[..., :3] - np.asarray(rgb)[:3]) < tol).all(axis=-1).sum())


def test_report_draws_the_pngs_and_summarises(run, capsys):
    assert report_command.main([str(run)]) == 0
    summary = last_json(capsys)
    out = run / "report"
    assert summary == dict(
        loss_png=str(out / "loss.png"), expert_load_png=str(out / "expert_load.png"),
        imbalance_png=str(out / "imbalance.png"), steps=12, layers=3, experts=EXPERTS,
        final_loss=pytest.approx(2.015), final_valid_loss=1.5,
        max_share=pytest.approx(0.925, abs=1e-6), max_share_layer=1)
    assert sorted(p.name for p in out.iterdir()) == ["expert_load.png", "imbalance.png",
                                                      "loss.png"]  # no temporary left
    images = {}
    for name in ("loss.png", "expert_load.png", "imbalance.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
        images[name] = imread(out / name)
        height, width, channels = images[name].shape
        assert height >= 200 and width >= 400 and channels in (3, 4)
    # the heatmap's colours are the shares': white cells at the balanced 1/E (layer 2), the
    # collapsed expert's last cell dark red, layer 3's idle experts (0.1) light blue
    norm, cmap = TwoSlopeNorm(vcenter=1 / EXPERTS, vmin=0, vmax=1), colormaps["RdBu_r"]
    heat = images["expert_load.png"]
    for share in (0.25, 0.925, 0.1):
        assert pixels_near(heat, cmap(norm(share))) > 300, share
    assert pixels_near(heat, cmap(norm(0.5))) < 100  # in the colorbar only: no cell has 0.5
    # imbalance 1 (layer 2, layer 1's first cell) at the bottom of viridis, 3.7 near the top
    ratio = images["imbalance.png"]
    for value in (1.0, 0.925 * 4):
        assert pixels_near(ratio, colormaps["viridis"]((value - 1) / 3)) > 300, value
    assert pixels_near(ratio, colormaps["viridis"](0.5)) < 100


def test_report_out_folder_and_cli(run, tmp_path, capsys):
    out = tmp_path / "elsewhere" / "plots"
    assert cli_main(["report", str(run), "--out", str(out)]) == 0
    assert last_json(capsys)["expert_load_png"] == str(out / "expert_load.png")
    assert (out / "imbalance.png").read_bytes()[:8] == PNG_SIGNATURE
    assert not (run / "report").exists()


def test_a_run_without_expert_loads_gets_the_loss_plot_and_a_note(single_rank, tmp_path,
                                                                   capsys):
    run = write_run(tmp_path / "old", with_loads=False)
    assert report_command.main([str(run)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["expert_load_png"] is None and summary["max_share"] is None
    assert summary["steps"] == 12
    assert lines[-2] == (f"{run / 'metrics.jsonl'}: no training row has expert_load (logged "
                         "before per-layer loads were recorded): expert_load.png and "
                         "imbalance.png not drawn")
    assert sorted(p.name for p in (run / "report").iterdir()) == ["loss.png"]


def test_rows_without_loads_before_a_resume_are_left_out_of_the_heatmaps(run, capsys):
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    old = json.loads(lines[1])
    del old["expert_load"]
    metrics.write_text("\n".join([lines[0], json.dumps(old)] + lines[2:]) + "\n")
    assert report_command.main([str(run)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-2].endswith("1 of 6 training rows have no expert_load (logged before "
                            "per-layer loads were recorded): the heatmaps start after step 2")
    train, _ = report.read_metrics(run)
    loaded = [r for r in train if "expert_load" in r]
    np.testing.assert_array_equal(report.step_edges(train, loaded), STEPS)
    np.testing.assert_allclose(report.load_matrix(loaded), expected_shares()[:, :, 1:],
                               atol=1e-6)


def train_row(step, **extra):
    return json.dumps(dict(step=step, loss=2.0, lm_loss=2.0, aux_loss=0.0, **extra))


@pytest.mark.parametrize("content,message", [
    (None, "{run}: no metrics.jsonl in it (not a `pesc train` output folder)"),
    (train_row(1) + "\n{\"step\": 2, \"loss\n",
     "{metrics}:2: invalid JSON (Unterminated string starting at: line 1 column 13 (char 12))"),
    ("[1, 2]\n", "{metrics}:1: not a metrics row (no numeric step)"),
    (train_row(1) + "\n" + train_row(2, expert_load=[[0.5, 0.5], [1.0]]) + "\n",
     "{metrics}:2: expert_load is not a [layers][experts] list of numbers"),
    (train_row(1, expert_load=[[0.5, 0.5]]) + "\n" + train_row(2, expert_load=[[1.0, 0, 0]])
     + "\n", "{metrics}:2: expert_load is 1 layers x 3 experts, earlier rows 1 x 2"),
    (train_row(4) + "\n" + train_row(2) + "\n",
     "{metrics}:2: step 2 after step 4 (rows out of order)"),
    ('{"step": 0, "valid_loss": 2.0, "valid_tokens": 5}\n',
     "{metrics}: no training rows (the run stopped before its first log interval?)"),
])
def test_user_errors_are_one_line(tmp_path, capsys, content, message):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    expected = message.format(run=run, metrics=run / "metrics.jsonl")
    with pytest.raises(ConfigError) as e:
        report_command.main([str(run)])
    assert str(e.value) == expected
    assert cli_main(["report", str(run)]) == 2
    assert capsys.readouterr().err == f"pesc report: error: {expected}\n"
    assert sorted(p.name for p in run.iterdir()) == ([] if content is None
                                                     else ["metrics.jsonl"])


def test_missing_folder(tmp_path, capsys):
    assert cli_main(["report", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"pesc report: error: {tmp_path / 'nope'}: no such folder\n"


def test_a_failed_write_leaves_no_png(run, monkeypatch):
    from matplotlib.figure import Figure

    def torn_savefig(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(PNG_SIGNATURE)  # a partial file, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", torn_savefig)
    with pytest.raises(ConfigError, match=r"/report: cannot write the report \(\[Errno 28\] "):
        report_command.main([str(run)])
    assert list((run / "report").iterdir()) == []
