"""Supervised fine-tuning configs: `python -m experiments.sft --config=configs/sft.py:PRESET --workdir=DIR
--config.init_from=PRETRAIN_WORKDIR`.

The loss covers response tokens only; the model (and, unless data.tokenizer is set, the tokenizer) come
from the `init_from` run. Presets: `tiny` (CPU), `llama-7b`, `bloom-7b1`, `glm-6b`.
"""
import ml_collections as mlc

from configs import common

PRESETS = ("tiny", "llama-7b", "bloom-7b1", "glm-6b")


def data(seq_len: int):
    c = mlc.ConfigDict()
    c.path = "data/sft/sample.jsonl"  # SFT rows: JSONL/JSON/Parquet/`datasets` dir, schemas in lm.data.builders
    c.tokenizer = ""  # a .model file or a tokenizer directory; "" = the init_from run's or HF directory's own
    c.chat_template = ""  # "" = the tokenizer's own; "chatml" or a Jinja file (for checkpoints that ship none)
    c.field_map = ""  # rename the file's columns to a known schema, e.g. "question=prompt,answer=response"
    c.seq_len = seq_len  # tokens per row
    c.pack = True  # several examples per row (attention never crosses them)
    c.overlong = "error"  # an example longer than seq_len: "error" (names it) or "truncate"
    c.eval_fraction = 0.05  # share of examples held out for evaluation
    c.cache_dir = ""  # prepared datasets; "" = $LM_DATA_CACHE or ~/.cache/chatgpt-jax/tfds
    return c


def get_config(preset: str = "tiny"):
    """The SFT config of `preset` (one of PRESETS)."""
    if preset == "tiny":
        c = common.base(model_preset="llama-tiny", steps=200, batch_size=8, lr=1e-3, warmup_steps=20,
                        checkpoint_every=100, log_every=10, eval_every=100)
        c.data = data(seq_len=128)  # what to read and how
    elif preset in ("llama-7b", "bloom-7b1", "glm-6b"):
        # Alpaca / InstructGPT-style SFT: lr 2e-5, batch 128, cosine, about 3 epochs of ~50k examples.
        c = common.base(model_preset=preset, steps=1200, batch_size=128, lr=2e-5, warmup_steps=40,
                        checkpoint_every=200, log_every=10, eval_every=200)
        c.optim.weight_decay = 0.0  # common for short fine-tunes
        c.data = data(seq_len=2048)  # what to read and how
        c.model.overrides.dtype = "bfloat16"  # bf16 matmuls, f32 params, norms and losses
        c.model.overrides.remat = "full"  # recompute each block in the backward pass
    else:
        raise ValueError(f"unknown sft preset {preset!r}; choose one of {PRESETS}")
    return c
