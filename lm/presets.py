"""Named model presets: real published sizes and a `*-tiny` of each family for CPU tests.

`get(name, **overrides)` returns a `ModelConfig`; `names()` lists them.
"""
from __future__ import annotations

from lm.config import ModelConfig

_LLAMA = dict(norm="rmsnorm", mlp="swiglu", position="rope", tie_embeddings=False)
_BLOOM = dict(norm="layernorm", norm_eps=1e-5, mlp="gelu", position="alibi", embed_norm=True, qkv_bias=True,
              out_bias=True, mlp_bias=True, tie_embeddings=True)
# ChatGLM-6B: DeepNorm post-LN, GELU MLP, 2D RoPE over the whole head split in halves, prefix-LM; the output
# head shares the word embeddings (HF's default tie), which gives the published 6.2B.
_GLM = dict(norm="layernorm", norm_eps=1e-5, residual="deepnorm", mlp="gelu", position="rope2d", mask="prefix",
            qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True)
_GPT = dict(norm="layernorm", norm_eps=1e-5, mlp="gelu", position="learned", qkv_bias=True, out_bias=True,
            mlp_bias=True, tie_embeddings=True)

_PRESETS = {
    # LLaMA (Touvron et al. 2023): 6.74B / 13.0B.
    "llama-7b": dict(_LLAMA, vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, d_ff=11008, max_len=2048),
    "llama-13b": dict(_LLAMA, vocab_size=32000, d_model=5120, n_layers=40, n_heads=40, d_ff=13824, max_len=2048),
    "llama2-7b": dict(_LLAMA, norm_eps=1e-5, vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, d_ff=11008,
                      max_len=4096),
    "llama-tiny": dict(_LLAMA, vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                       max_len=256, scan_unroll=0),
    # BLOOM (BigScience 2022): 559M / 7.07B.
    "bloom-560m": dict(_BLOOM, vocab_size=250880, d_model=1024, n_layers=24, n_heads=16, d_ff=4096, max_len=2048),
    "bloom-7b1": dict(_BLOOM, vocab_size=250880, d_model=4096, n_layers=30, n_heads=32, d_ff=16384, max_len=2048),
    "bloom-tiny": dict(_BLOOM, vocab_size=512, d_model=64, n_layers=2, n_heads=4, d_ff=256, max_len=256, scan_unroll=0),
    # ChatGLM-6B (THUDM 2023): 28 layers, 130528-token vocabulary, 6.17B.
    "glm-6b": dict(_GLM, vocab_size=130528, d_model=4096, n_layers=28, n_heads=32, d_ff=16384, max_len=2048),
    # GLM-130B: DeepNorm, GeGLU, 2D RoPE, embedding-gradient shrink 0.1.
    "glm-130b": dict(_GLM, mlp="geglu", vocab_size=150528, d_model=12288, n_layers=70, n_heads=96, d_ff=32768,
                     max_len=2048, embed_grad_scale=0.1),
    "glm-tiny": dict(_GLM, vocab_size=512, d_model=64, n_layers=2, n_heads=4, d_ff=256, max_len=256, scan_unroll=0),
    # Baichuan: 7B is LLaMA-like; 13B swaps RoPE for ALiBi.
    "baichuan-7b": dict(_LLAMA, vocab_size=64000, d_model=4096, n_layers=32, n_heads=32, d_ff=11008, max_len=4096),
    "baichuan-13b": dict(_LLAMA, position="alibi", vocab_size=64000, d_model=5120, n_layers=40, n_heads=40,
                         d_ff=13696, max_len=4096),
    "baichuan-tiny": dict(_LLAMA, position="alibi", vocab_size=512, d_model=64, n_layers=2, n_heads=4, d_ff=160,
                          max_len=256, scan_unroll=0),
    # GPT-2 small (124M) and GPT-3 (175B).
    "gpt2-124m": dict(_GPT, vocab_size=50257, d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_len=1024),
    "gpt3-175b": dict(_GPT, vocab_size=50257, d_model=12288, n_layers=96, n_heads=96, d_ff=49152, max_len=2048),
    "gpt2-tiny": dict(_GPT, vocab_size=512, d_model=64, n_layers=2, n_heads=4, d_ff=256, max_len=256, scan_unroll=0),
}


def names() -> list[str]:
    """All preset names."""
    return sorted(_PRESETS)


def get(name: str, **overrides) -> ModelConfig:
    """The `ModelConfig` of preset `name`, with optional field overrides."""
    if name not in _PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known presets: {', '.join(names())}")
    return ModelConfig(**{**_PRESETS[name], **overrides})
