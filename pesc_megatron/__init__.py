"""PESC on megatron-core. `pesc_megatron.register_auto_classes()` registers the Camelidae model
classes with transformers' Auto classes, so exported models load without trust_remote_code.
Importing the package does not import transformers: every rank of every command would pay
for it (1-2 s of CPU each), and only conversion and export need it."""
__version__ = "0.1.0"


def register_auto_classes() -> None:
    """AutoConfig / AutoModelForCausalLM resolve `model_type: camelidae` to this package's
    classes (idempotent; needs transformers)."""
    # Local on purpose: hf_modeling imports transformers, which the package does not import
    # until a command needs it (see above).
    from pesc_megatron.interop.hf_modeling import register_auto_classes as register

    register()
