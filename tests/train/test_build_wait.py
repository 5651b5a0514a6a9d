"""The other ranks wait for a cold data build longer than the default process group's timeout
(`train.dist_timeout_minutes`): the wait has its own group and timeout."""
import datetime
import os
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from pesc_megatron.data import load_tokenizer
from pesc_megatron.train import batches
from pesc_megatron.train.config import DataConfig, JobConfig, TrainModelConfig
from tests.helpers import tiny
from tests.helpers.workers import spawn

# starts processes (torch.multiprocessing)
pytestmark = pytest.mark.multiprocess

GROUP_TIMEOUT_S, BUILD_S = 5, 10


def start_together(folder: Path) -> None:
    """Returns once every rank has called it: the ranks then join the short-timeout group
    within milliseconds of each other, however long each took to start."""
    (folder / f"ready{os.environ['RANK']}").touch()
    while len(list(folder.glob("ready*"))) < int(os.environ["WORLD_SIZE"]):
        time.sleep(0.01)


def slow_build_worker(ckpt: str, data: str, cache: str) -> None:
    start_together(Path(cache).parent)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
    real = batches.build_dataset

    def slow(*args, builder, **kwargs):
        if builder:
            time.sleep(BUILD_S)  # rank 0 builds for longer than the group's timeout
        return real(*args, builder=builder, **kwargs)

    batches.build_dataset = slow
    job = JobConfig(model=TrainModelConfig(checkpoint=ckpt), data=DataConfig(train=[data]))
    dataset = batches.build_data([data], load_tokenizer(f"{ckpt}/tokenizer"), job,
                                 Path(cache), packing=True)
    assert len(dataset) > 0
    dist.destroy_process_group()


def test_ranks_wait_for_a_build_longer_than_the_group_timeout(tmp_path):
    ckpt = tiny.make_checkpoint(tmp_path)
    data = tiny.write_jsonl(tmp_path / "records.jsonl",
                            [{"text": " ".join(tiny.WORDS[:8])}] * 4)
    spawn(slow_build_worker, 2, str(ckpt), str(data), str(tmp_path / "cache"))
