"""PESC on megatron-core. Importing the package registers the Camelidae model classes with
transformers' Auto classes, so exported models load without trust_remote_code."""
__version__ = "0.1.0"

try:
    from pesc_megatron.convert.hf_modeling import register_auto_classes as _register
except ImportError:  # transformers missing: conversion and export are unavailable
    pass
else:
    _register()
