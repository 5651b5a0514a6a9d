"""`pesc train` whose second background (train.async_save) checkpoint write is slow: its
writer process sleeps a minute first, so that a test can kill the job while that save is in
flight. Run under torchrun by tests/train/test_async_save.py."""
import functools
import sys
import time

from megatron.core.dist_checkpointing.strategies import async_utils

from pesc_megatron.cli import main

_schedule, _calls = async_utils.TemporalAsyncCaller.schedule_async_call, []


def _sleep_then(fn, *args, **kwargs):
    time.sleep(60)
    return fn(*args, **kwargs)


def schedule_slowly(self, async_req):
    _calls.append(1)
    if len(_calls) == 2 and async_req.async_fn is not None:
        async_req = async_req._replace(async_fn=functools.partial(_sleep_then,
                                                                  async_req.async_fn))
    return _schedule(self, async_req)


if __name__ == "__main__":
    async_utils.TemporalAsyncCaller.schedule_async_call = schedule_slowly
    sys.exit(main(["train", *sys.argv[1:]]))
