"""Decoder language models in JAX/Flax: one Transformer for LLaMA, BLOOM, GLM, Baichuan and GPT.

Public API: `ModelConfig` and `presets` (architectures), `Transformer`, `init_params`, `init_cache`,
`count_params`, `default_positions` (the model), `generate` (KV-cache sampling), `hf` (Hugging Face
checkpoints), `tokenizer` and `data` (sentencepiece, tfds/grain pipelines), `kernels` (attention and RoPE).
Training machinery lives in `lm.sharding`, `lm.optim`, `lm.train`, `lm.trainer`, `lm.losses`, `lm.checkpoint`.
"""
from lm.config import ModelConfig
from lm.model import Transformer, count_params, default_positions, init_cache, init_params
from lm import data, hf, kernels, presets, tokenizer
from lm.generate import generate

__all__ = ["ModelConfig", "Transformer", "count_params", "data", "default_positions", "generate", "hf",
           "init_cache", "init_params", "kernels", "presets", "tokenizer"]
