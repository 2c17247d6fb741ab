"""Reward-model configs: `python -m experiments.reward --config=configs/reward.py:PRESET --workdir=DIR
--config.init_from=SFT_WORKDIR`.

The reward model is the SFT model with its language-model head replaced by a scalar head (InstructGPT),
trained with the K-wise ranking loss (rl.reward.ranking_loss) on ranked responses. Presets: `tiny` (CPU),
`llama-7b`, `bloom-7b1`, `glm-6b`.
"""
import ml_collections as mlc

from configs import common
from rl.reward import RewardConfig

PRESETS = ("tiny", "llama-7b", "bloom-7b1", "glm-6b")


def data(seq_len: int, k: int):
    c = mlc.ConfigDict()
    # Preference rows (JSONL/JSON/Parquet/`datasets` dir): {prompt, responses, ranks} (0 = best, ties share a
    # rank), {prompt, chosen, rejected} as strings or message lists, or Anthropic-HH transcripts; lm.data.builders
    c.path = "data/preference/sample.jsonl"
    c.tokenizer = ""  # a .model file or a tokenizer directory; "" = the init_from run's or HF directory's own
    c.chat_template = ""  # "" = the tokenizer's own; "chatml" or a Jinja file (for checkpoints that ship none)
    c.field_map = ""  # rename the file's columns to a known schema, e.g. "question=prompt,answer=response"
    c.seq_len = seq_len  # tokens per response (prompt + response + eos)
    c.k = k  # responses per prompt in a batch row (InstructGPT: 4 to 9); fewer are padded as absent
    c.overlong = "error"  # a response longer than seq_len: "error" (names it) or "truncate"
    c.eval_fraction = 0.1  # share of prompts held out (held-out pairwise accuracy)
    c.cache_dir = ""  # prepared datasets; "" = $LM_DATA_CACHE or ~/.cache/chatgpt-jax/tfds
    return c


def get_config(preset: str = "tiny"):
    """The reward-model config of `preset` (one of PRESETS)."""
    if preset == "tiny":
        c = common.base(model_preset="llama-tiny", steps=200, batch_size=8, lr=1e-4, warmup_steps=20,
                        checkpoint_every=100, log_every=10, eval_every=50)
        c.data = data(seq_len=64, k=4)
        c.optim.weight_decay = 0.0
    elif preset in ("llama-7b", "bloom-7b1", "glm-6b"):
        # InstructGPT 6B RM: one epoch, lr 9e-6, cosine, batch 64 prompts (up to C(9,2) = 36 pairs each).
        c = common.base(model_preset=preset, steps=1000, batch_size=64, lr=9e-6, warmup_steps=20,
                        checkpoint_every=200, log_every=10, eval_every=200)
        c.data = data(seq_len=1024, k=9)
        c.optim.weight_decay = 0.0
        c.model.overrides.dtype = "bfloat16"  # bf16 matmuls, f32 params, norms and losses
        c.model.overrides.remat = "full"  # K x B sequences per step: recompute blocks in the backward pass
    else:
        raise ValueError(f"unknown reward preset {preset!r}; choose one of {PRESETS}")
    c.reward = common.from_dataclass(RewardConfig)  # head init, score normalisation (rl.reward.RewardConfig)
    return c
