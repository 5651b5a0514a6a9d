"""The per-token objective (`train.per_token_loss`, the default) gives the same gradient and
the same update at any micro-batch size and layout; megatron-core's mean of micro-batch means
does not (so the check can fail). Real records with different target counts, one Adam step."""
import pytest
import torch

from pesc_megatron.data import build_dataset, load_tokenizer
from tests.helpers import tiny
from tests.helpers.workers import objective_worker, spawn

# Every test here starts processes (torch.multiprocessing).
pytestmark = pytest.mark.multiprocess

LAYOUTS = {  # name: (world, layout)
    "micro_batches_4x1": (1, dict(micro_batch_size=1)),
    "dp2": (2, dict(micro_batch_size=1)),
    "ep2": (2, dict(micro_batch_size=1, ep=2)),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny checkpoint, four unpacked sequences of real records whose loss-token counts
    all differ, and the reference: one rank, one micro-batch of four."""
    root = tmp_path_factory.mktemp("objective")
    ckpt = tiny.make_checkpoint(root)
    words = tiny.WORDS
    records = [  # answers of 1 to 12 words, in three of the training formats
        {"messages": [{"role": "user", "content": "what is one"},
                      {"role": "assistant", "content": words[0]}]},
        {"instruction": "list four", "input": "", "output": " ".join(words[1:5])},
        {"messages": [{"role": "user", "content": "sort them"},
                      {"role": "assistant", "content": " ".join(words[5:12])}]},
        {"text": " ".join(words[12:24])},
    ]
    data = tiny.write_jsonl(root / "records.jsonl", records)
    dataset = build_dataset([str(data)], load_tokenizer(ckpt / "tokenizer"), seq_length=64,
                            packing=False)
    items = [dataset[i] for i in range(len(dataset))]
    counts = [int(item["loss_mask"].sum()) for item in items]
    assert len(items) == 4 and len(set(counts)) == 4, counts
    torch.save(items, root / "items.pt")

    def run(name, world, **layout):
        spawn(objective_worker, world, {"per_token": True, **layout}, str(ckpt),
              str(root / "items.pt"), str(root / "weights"), str(root / f"{name}.pt"))
        return torch.load(root / f"{name}.pt")

    return run, run("reference", 1, micro_batch_size=4)


def assert_same_step(got, want, rtol=1e-6):
    assert abs(got["grad_norm"] - want["grad_norm"]) <= rtol * want["grad_norm"]
    assert abs(got["lm"] - want["lm"]) <= rtol * want["lm"]
    assert got["weights"].keys() == want["weights"].keys()
    for key, w in want["weights"].items():
        torch.testing.assert_close(got["weights"][key], w, rtol=rtol,
                                   atol=rtol * w.abs().max().item(), msg=key)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_per_token_loss_is_the_same_at_every_layout(setup, name):
    run, reference = setup
    world, layout = LAYOUTS[name]
    assert_same_step(run(name, world, **layout), reference)


def test_micro_batch_means_depend_on_the_micro_batch_size(setup):
    run, _ = setup
    one = run("old_4", 1, micro_batch_size=4, per_token=False)
    four = run("old_1x4", 1, micro_batch_size=1, per_token=False)
    assert abs(one["grad_norm"] - four["grad_norm"]) > 1e-3 * one["grad_norm"]
    # its logged loss is the mean of the micro-batches' means, not the token mean
    assert abs(one["lm"] - four["lm"]) > 1e-3 * one["lm"]
