"""The `pesc` command: thin dispatch to one module per command (cli/*.py), which parse their
arguments (shared groups in cli/args.py) and call the package."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from pesc_megatron.schema import UserError
from pesc_megatron.train import preemption

COMMANDS = {
    "convert": ("pesc_megatron.cli.convert", "Hugging Face <-> PESC checkpoints"),
    "train": ("pesc_megatron.cli.train", "instruction-tune a PESC checkpoint (YAML config)"),
    "preprocess": ("pesc_megatron.cli.preprocess",
                   "tokenise a data source into a token store, offline, in N processes"),
    "eval": ("pesc_megatron.cli.eval", "mean loss on a data file, or lm-eval tasks (--tasks)"),
    "info": ("pesc_megatron.cli.info", "parameter counts (dense, routers, adapters, LoRA)"),
    "plan": ("pesc_megatron.cli.plan",
             "per-GPU memory of a training layout; suggests one that fits"),
    "demo": ("pesc_megatron.cli.demo", "craft a small random model and train its experts (CPU)"),
    "report": ("pesc_megatron.cli.report", "PNG loss curves and expert-load heatmaps of a run"),
    "bench": (None, "benchmarks: `pesc bench compare|layer|memory`"),
}
# The benchmarks keep their parsers beside their code: each also runs its own child processes.
BENCHES = {"compare": "pesc_megatron.bench.compare", "layer": "pesc_megatron.bench.layer",
           "memory": "pesc_megatron.bench.memory"}
# megatron-core's (and torch's) notices about optional packages and their own deprecations,
# repeated by every rank at import: silenced here and in the test suite (tests/conftest.py);
# the README lists what runs without TE and apex. Message regexes, matched at the start.
KNOWN_NOISE = (r"Apex is not installed", r"Transformer Engine and Apex are not installed",
               r"Please use DTensor instead", r"`load_state_dict` is deprecated",
               r"full scope is deprecated", r"`torch.distributed.\w+` is deprecated",
               r"If you are using transformer_engine as the transformer implementation",
               r"MLP requires ffn_hidden_size", r"Warning: tp_group is None",
               r"`torch.jit.script_method` is deprecated",
               r"The following imports from `dynamic_context.py`",
               r"The 'megatron.core.transformer.custom_layers.transformer_engine'")

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for message in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message)
    # torchao (our FP8 base) logs on CPU builds that its CUDA-only kernels do not load, and
    # torch that torchao registers enums the old way: expected, and they would open every
    # command's output. (The package itself leaves logging alone: a library must.)
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(
        prog="pesc", description="PESC on megatron-core: craft dense LLMs into mixture-of-"
        "adapter-experts models and tune them. `pesc COMMAND --help` for each command.")
    parser.add_argument("command", choices=list(COMMANDS),
                        help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items()))
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv[:1] if argv and not argv[0].startswith("-") else argv)
    rest = argv[1:]
    module = COMMANDS[ns.command][0]
    if ns.command == "bench":
        if not rest or rest[0] not in BENCHES:
            parser.error(f"bench needs one of: {', '.join(BENCHES)}")
        module, rest = BENCHES[rest[0]], rest[1:]
    if ns.command == "train":  # before its imports, which take seconds (train/preemption.py)
        preemption.record_signals()
    try:
        return __import__(module, fromlist=["main"]).main(rest)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank stops; one says why
            print(f"pesc {ns.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        preemption.restore()


if __name__ == "__main__":
    raise SystemExit(main())
