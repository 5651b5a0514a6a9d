"""`torchrun ... -m pesc_megatron.train CONFIG.yaml [key=value ...]` (same as `pesc train`)."""
from pesc_megatron.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *__import__("sys").argv[1:]]))
