"""PESC on megatron-core. Importing the package registers the Camelidae model classes with
transformers' Auto classes, so exported models load without trust_remote_code."""
__version__ = "0.1.0"

try:
    import transformers  # noqa: F401
except ModuleNotFoundError:  # conversion and export need transformers; the rest does not
    pass
else:
    from pesc_megatron.convert.hf_modeling import register_auto_classes

    register_auto_classes()
