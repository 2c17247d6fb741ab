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

# Newer open families, each a preset of the same fields.
_LLAMA3 = dict(_LLAMA, norm_eps=1e-5, rope_theta=500000.0)
_QWEN2 = dict(_LLAMA, qkv_bias=True, rope_theta=1000000.0)
_QWEN3 = dict(_LLAMA, qk_norm=True, rope_theta=1000000.0)
_MISTRAL = dict(_LLAMA, norm_eps=1e-5)
# Gemma2: (1 + w) RMSNorms before and after each sub-layer, sqrt(d) embedding scale, tanh-GELU gated MLP,
# soft-capped attention (50) and output (30) logits, local (4096) and global layers alternating.
_GEMMA2 = dict(_LLAMA, mlp="geglu", gelu_approximate=True, norm_scale_offset=1.0, embed_scale=True, post_norms=True,
               attn_softcap=50.0, final_softcap=30.0, window_pattern="LG", tie_embeddings=True)
# Gemma3 (text): Gemma2's norms and embedding scale plus (1 + w) q/k norms, no soft-caps, five local layers per
# global one, and a RoPE base of 1e4 on the local layers against 1e6 on the global ones.
_GEMMA3 = dict(_LLAMA, mlp="geglu", gelu_approximate=True, norm_scale_offset=1.0, embed_scale=True, post_norms=True,
               qk_norm=True, window_pattern="LLLLLG", rope_theta=1000000.0, local_rope_theta=10000.0,
               tie_embeddings=True)
_PHI3 = dict(_LLAMA, norm_eps=1e-5)
# GPT-NeoX / Pythia: parallel attention and MLP, a quarter of each head rotated, exact GELU, biases.
_NEOX = dict(norm="layernorm", norm_eps=1e-5, residual="parallel", mlp="gelu", gelu_approximate=False,
             position="rope", rope_fraction=0.25, qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=False)
# OPT: LayerNorm, ReLU MLP, learned positions read two rows past the position, tied output.
_OPT = dict(norm="layernorm", norm_eps=1e-5, mlp="relu", position="learned", pos_offset=2, qkv_bias=True,
            out_bias=True, mlp_bias=True, tie_embeddings=True)
# ChatGLM2/3-6B: GLM-4's math (RMSNorm, SwiGLU, interleaved RoPE on half of each head, qkv bias) with
# multi-query groups of 2 K/V heads.
_CHATGLM2 = dict(_LLAMA, norm_eps=1e-5, rope_fraction=0.5, rope_interleaved=True, qkv_bias=True)
_TINY = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_len=256, scan_unroll=0)

_PRESETS = {
    # LLaMA (Touvron et al. 2023): 6.74B / 13.0B; Llama 2 (2023): 7B as LLaMA with a 4k context, 70B 68.98B.
    "llama-7b": dict(_LLAMA, vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, d_ff=11008, max_len=2048),
    "llama-13b": dict(_LLAMA, vocab_size=32000, d_model=5120, n_layers=40, n_heads=40, d_ff=13824, max_len=2048),
    "llama2-7b": dict(_LLAMA, norm_eps=1e-5, vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, d_ff=11008,
                      max_len=4096),
    "llama2-70b": dict(_LLAMA, norm_eps=1e-5, vocab_size=32000, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                       d_ff=28672, max_len=4096),  # GQA: 8 K/V heads
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
    # Llama 3 (8.03B) and Llama 3.2 (1.24B, tied, llama3-scaled RoPE to 128K from 8K).
    "llama3-8b": dict(_LLAMA3, vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
                      max_len=8192),
    "llama3.2-1b": dict(_LLAMA3, vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192,
                        max_len=131072, tie_embeddings=True, rope_scaling="llama3", rope_factor=32.0,
                        rope_original_max_len=8192, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0),
    "llama3-tiny": dict(_LLAMA3, **_TINY, rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=32,
                        rope_low_freq_factor=1.0, rope_high_freq_factor=4.0),
    # Qwen2.5-7B (7.62B) and Qwen3-8B (8.19B).
    "qwen2.5-7b": dict(_QWEN2, vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, d_ff=18944,
                       max_len=32768),
    "qwen2-tiny": dict(_QWEN2, **_TINY),
    "qwen3-8b": dict(_QWEN3, vocab_size=151936, d_model=4096, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128,
                     d_ff=12288, max_len=40960),
    "qwen3-tiny": dict(_QWEN3, **dict(_TINY, n_heads=3, n_kv_heads=1), head_dim=24),
    # Mistral-7B v0.1 (7.24B): a 4096-token sliding window on every layer.
    "mistral-7b": dict(_MISTRAL, vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
                       max_len=32768, sliding_window=4096),
    "mistral-tiny": dict(_MISTRAL, **_TINY, sliding_window=16),
    # Gemma2-9B (9.24B).
    "gemma2-9b": dict(_GEMMA2, vocab_size=256000, d_model=3584, n_layers=42, n_heads=16, n_kv_heads=8, head_dim=256,
                      d_ff=14336, max_len=8192, sliding_window=4096, query_pre_attn_scalar=256.0),
    "gemma2-tiny": dict(_GEMMA2, **dict(_TINY, n_layers=4), head_dim=32, sliding_window=16, query_pre_attn_scalar=24.0),
    # Gemma3-1B (1.00B; 26 layers, so the pattern's last period is cut short).
    "gemma3-1b": dict(_GEMMA3, vocab_size=262144, d_model=1152, n_layers=26, n_heads=4, n_kv_heads=1, head_dim=256,
                      d_ff=6912, max_len=32768, sliding_window=512, query_pre_attn_scalar=256.0),
    "gemma3-tiny": dict(_GEMMA3, **dict(_TINY, n_layers=3), head_dim=16, sliding_window=16,
                        window_pattern="LLG", query_pre_attn_scalar=16.0),
    # Phi-3-mini-4k (3.82B).
    "phi3-mini": dict(_PHI3, vocab_size=32064, d_model=3072, n_layers=32, n_heads=32, d_ff=8192, max_len=4096,
                      sliding_window=2047),
    "phi3-tiny": dict(_PHI3, **dict(_TINY, n_kv_heads=None)),
    # Pythia-1.4B (GPT-NeoX, 1.41B).
    "pythia-1.4b": dict(_NEOX, vocab_size=50304, d_model=2048, n_layers=24, n_heads=16, d_ff=8192, max_len=2048),
    "neox-tiny": dict(_NEOX, **dict(_TINY, n_kv_heads=None), rope_fraction=0.5),
    # OPT-1.3B.
    "opt-1.3b": dict(_OPT, vocab_size=50272, d_model=2048, n_layers=24, n_heads=32, d_ff=8192, max_len=2048),
    "opt-tiny": dict(_OPT, **dict(_TINY, n_kv_heads=None)),
    # ChatGLM2-6B (6.24B) / ChatGLM3-6B (same shapes).
    "chatglm2-6b": dict(_CHATGLM2, vocab_size=65024, d_model=4096, n_layers=28, n_heads=32, n_kv_heads=2,
                        d_ff=13696, max_len=32768),
    "chatglm2-tiny": dict(_CHATGLM2, **_TINY),
}


def names() -> list[str]:
    """All preset names."""
    return sorted(_PRESETS)


def get(name: str, **overrides) -> ModelConfig:
    """The `ModelConfig` of preset `name`, with optional field overrides."""
    if name not in _PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known presets: {', '.join(names())}")
    return ModelConfig(**{**_PRESETS[name], **overrides})
