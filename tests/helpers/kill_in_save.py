"""`pesc train` whose rank 0 is SIGKILLed in the middle of its second checkpoint write: after
megatron-core has written the weights into the hidden partial folder, before the folder is
complete (no train_state.json) and renamed. Run under torchrun by test_train.py."""
import os
import signal
import sys

from megatron.core import dist_checkpointing

from pesc_megatron.cli import main

_save, _calls = dist_checkpointing.save, []


def save_then_die(*args, **kwargs):
    result = _save(*args, **kwargs)
    _calls.append(1)
    if len(_calls) == 2 and os.environ.get("RANK") == "0":
        os.kill(os.getpid(), signal.SIGKILL)
    return result


if __name__ == "__main__":
    dist_checkpointing.save = save_then_die
    sys.exit(main(["train", *sys.argv[1:]]))
