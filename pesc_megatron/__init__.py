"""PESC on megatron-core. Importing the package registers the Camelidae model classes with
transformers' Auto classes, so exported models load without trust_remote_code."""
__version__ = "0.1.0"

import logging

# transformers imports torchao (our FP8 base) when it is installed; on CPU builds torchao logs
# that its CUDA-only kernels do not load, and torch that torchao registers enums the old way.
# Both are expected and would otherwise open every command's output.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

try:
    import transformers  # noqa: F401
except ModuleNotFoundError:  # conversion and export need transformers; the rest does not
    pass
else:
    from pesc_megatron.convert.hf_modeling import register_auto_classes

    register_auto_classes()
