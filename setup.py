"""Installable packages: the `lm` and `rl` libraries, the `experiments` launchers and demo, and `configs`."""
from setuptools import find_packages, setup

setup(
    name="chatgpt-jax",
    version="0.1.0",
    description="Pretraining, SFT, reward modelling and RLHF (PPO, DPO) for decoder LMs in JAX/Flax.",
    python_requires=">=3.10",
    packages=find_packages(include=["lm", "lm.*", "rl", "rl.*", "experiments", "configs"]),
    install_requires=[
        "jax>=0.6.2,<0.11",
        "jaxlib>=0.6.2,<0.11",
        "flax>=0.10.6,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11.0,<0.13",
        "chex>=0.1.88",
        "ml_collections>=0.1.1,<2",
        "absl-py>=2.0",
        "sentencepiece>=0.2.0,<0.3",
        "tokenizers>=0.20,<1",  # Hugging Face tokenizer.json files (lm.tokenizers)
        "jinja2>=3.1.6",  # checkpoints' chat templates, rendered sandboxed as transformers does
        "tensorflow-datasets>=4.9.6,<5",
        "array_record>=0.5.0",
        "grain>=0.2.2,<0.3",
        "pyarrow>=14",  # Parquet files and `datasets` save_to_disk directories as training data (lm.data.builders)
        "safetensors>=0.4",
        "tqdm>=4.60",
        "numpy>=1.26",
        "tensorboardX>=2.6",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            "datasets>=2.14",  # reference writers of Parquet and save_to_disk data (tests/lm/test_data_formats.py)
            "torch==2.13.0",
            "transformers>=4.57,<6",
            "peft>=0.13",  # reference loader of PEFT adapter directories (tests/lm/test_hf_adapter.py)
            "lm_eval==0.4.13",  # the `eval` extra, so CI runs tests/lm/test_eval_harness.py
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
        ],
        # lm-evaluation-harness task suites on any checkpoint (lm.eval_harness, experiments/lm_eval.py); pinned:
        # the adapter extends its TemplateLM and uses its generation helpers, internals that move between releases.
        "eval": ["lm_eval==0.4.13"],
        # Peers the benchmarks compare against (bench/ppo_step.py needs TRL's PPOTrainer, gone after 0.29).
        "bench": ["trl==0.29.1"],
    },
)
