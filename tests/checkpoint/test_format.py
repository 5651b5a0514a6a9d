"""How a training checkpoint finds its base: through the path relative to its run, else the
absolute one, else `--base`; a base that is not the run's is refused (one line)."""
import json
import shutil

import pytest

from pesc_megatron.checkpoint.format import (
    HF_CONFIG,
    META,
    TRAIN_FORMAT,
    TRAIN_META,
    base_paths,
    resolve,
)
from pesc_megatron.schema import ConfigError


def make_run(root):
    """root/base (settings only) and root/run with one training checkpoint pointing to it."""
    base = root / "base"
    base.mkdir(parents=True)
    (base / META).write_text(json.dumps({"format": "pesc-megatron/1", "pesc": {"topk": 2}}))
    (base / HF_CONFIG).write_text("{}")
    trained = root / "run" / "checkpoints" / "iter_0000002"
    trained.mkdir(parents=True)
    state = dict(format=TRAIN_FORMAT, iteration=2, **base_paths(trained, base))
    (trained / TRAIN_META).write_text(json.dumps(state))
    (trained.parent / "latest").write_text("iter_0000002\n")
    return base, root / "run"


def test_relative_then_absolute_then_the_override(tmp_path):
    base, run = make_run(tmp_path / "a")
    assert resolve(run)[0] == base
    shutil.move(tmp_path / "a", tmp_path / "b")  # run and base together: the relative path
    assert resolve(tmp_path / "b" / "run")[0] == tmp_path / "b" / "base"
    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "b" / "base", moved)
    with pytest.raises(ConfigError) as e:
        resolve(tmp_path / "b" / "run")
    line = str(e.value)
    assert "its base checkpoint is missing" in line and "--base" in line and "\n" not in line
    assert str(tmp_path / "b" / "base") in line and str(base) in line  # both paths tried
    assert resolve(tmp_path / "b" / "run", base=moved)[0] == moved


def test_a_base_that_is_not_the_runs_is_refused(tmp_path):
    base, run = make_run(tmp_path)
    with pytest.raises(ConfigError, match=r"--base .*nowhere: not a base checkpoint \(no "):
        resolve(run, base=tmp_path / "nowhere")
    other = tmp_path / "other"
    shutil.copytree(base, other)
    (other / META).write_text(json.dumps({"format": "pesc-megatron/1", "pesc": {"topk": 1}}))
    with pytest.raises(ConfigError, match=r"not the base .* was trained from \(pesc.json or "
                                          r"hf_config.json differ\)"):
        resolve(run, base=other)
