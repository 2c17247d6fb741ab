"""Decoder language models in JAX/Flax: one Transformer for LLaMA, BLOOM, GLM, Baichuan and GPT."""
from lm.config import ModelConfig
from lm.model import Transformer, count_params, default_positions, init_cache, init_params
from lm import presets
from lm import data, tokenizer
from lm import hf
from lm.generate import generate

__all__ = ["ModelConfig", "Transformer", "count_params", "default_positions", "init_cache", "init_params",
           "presets"]
