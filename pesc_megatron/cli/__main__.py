"""`python -m pesc_megatron.cli COMMAND ...` (the same as `pesc COMMAND ...`)."""
from pesc_megatron.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
