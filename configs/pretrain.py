"""Pretraining configs: `python -m experiments.pretrain --config=configs/pretrain.py:PRESET --workdir=DIR`.

Presets: `tiny` (LLaMA-style, CPU, a couple of minutes), `glm-tiny` (GLM blank infilling, CPU), and the
real sizes `llama-7b`, `bloom-7b1`, `glm-6b` (TPU/GPU; point data.path and data.tokenizer at real data).
"""
import ml_collections as mlc

from configs import common

PRESETS = ("tiny", "glm-tiny", "llama-7b", "bloom-7b1", "glm-6b")


def data(objective: str, seq_len: int, vocab_size: int):
    c = mlc.ConfigDict()
    c.path = "data/text"  # a .txt file or a directory of them (searched recursively)
    c.tokenizer = ""  # a .model file or a tokenizer directory; "" = init_from's, else train one on data.path
    c.vocab_size = vocab_size  # vocabulary of a tokenizer trained here (at most the model's vocab_size)
    c.seq_len = seq_len  # tokens per row; documents are concatenated and split into rows
    c.objective = objective  # "causal" (next token) or "glm" (autoregressive blank infilling)
    c.mask_ratio = 0.15  # GLM: share of tokens inside masked spans
    c.poisson_lambda = 3.0  # GLM: mean span length
    c.gmask_prob = 0.5  # GLM: share of rows with one long trailing [gMASK] span instead of [MASK] spans
    c.eval_fraction = 0.05  # share of documents held out for evaluation
    c.cache_dir = ""  # prepared datasets; "" = $LM_DATA_CACHE or ~/.cache/chatgpt-jax/tfds
    return c


def get_config(preset: str = "tiny"):
    """The pretraining config of `preset` (one of PRESETS)."""
    if preset in ("tiny", "glm-tiny"):
        c = common.base(model_preset="llama-tiny" if preset == "tiny" else "glm-tiny", steps=300, batch_size=8,
                        lr=3e-3, warmup_steps=30, checkpoint_every=100, log_every=10, eval_every=100)
        c.data = data("causal" if preset == "tiny" else "glm", seq_len=128, vocab_size=2048)  # what to read and how
        c.model.overrides.vocab_size = 2048  # the bundled English + Chinese text needs ~1,300 pieces
    elif preset == "llama-7b":
        # LLaMA-7B: 4M-token batches (2048 x 2048), lr 3e-4, 2000 warmup steps, cosine to 10%, 1T tokens.
        c = common.base(model_preset="llama-7b", steps=250_000, batch_size=2048, lr=3e-4, warmup_steps=2000,
                        checkpoint_every=1000, log_every=10, eval_every=1000)
        c.data = data("causal", seq_len=2048, vocab_size=32000)  # what to read and how
    elif preset == "bloom-7b1":
        # BLOOM-7b1: 512 x 2048 tokens per batch, lr 1.2e-4, ~375M warmup tokens, cosine to 10%.
        c = common.base(model_preset="bloom-7b1", steps=330_000, batch_size=512, lr=1.2e-4, warmup_steps=360,
                        checkpoint_every=1000, log_every=10, eval_every=1000)
        c.data = data("causal", seq_len=2048, vocab_size=250880)  # what to read and how
    elif preset == "glm-6b":
        # ChatGLM-6B's pretraining recipe is unpublished; these follow GLM-130B's (lr 8e-5, blank infilling
        # with [MASK] and [gMASK]) at a smaller batch.
        c = common.base(model_preset="glm-6b", steps=200_000, batch_size=1024, lr=8e-5, warmup_steps=2000,
                        checkpoint_every=1000, log_every=10, eval_every=1000)
        c.data = data("glm", seq_len=2048, vocab_size=130528)  # what to read and how
    else:
        raise ValueError(f"unknown pretrain preset {preset!r}; choose one of {PRESETS}")
    if preset not in ("tiny", "glm-tiny"):
        c.model.overrides.dtype = "bfloat16"  # bf16 matmuls, f32 params, norms and losses
        c.model.overrides.remat = "full"  # recompute each block in the backward pass to fit 2048-token rows
    return c
