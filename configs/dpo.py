"""DPO configs: `python -m experiments.dpo --config=configs/dpo.py:PRESET --workdir=DIR --config.init_from=SFT_WORKDIR`.

The policy starts from the SFT run and is trained on the reward model's preference data against the frozen
SFT model as reference (rl.dpo). Presets: `tiny` (CPU), `llama-7b`, `bloom-7b1`, `glm-6b`.
"""
from configs import common
from configs import reward as reward_config
from rl.dpo import DPOConfig

PRESETS = ("tiny", "llama-7b", "bloom-7b1", "glm-6b")


def get_config(preset: str = "tiny"):
    """The DPO config of `preset` (one of PRESETS)."""
    if preset == "tiny":
        c = common.base(model_preset="llama-tiny", steps=200, batch_size=8, lr=1e-4, warmup_steps=20,
                        checkpoint_every=100, log_every=10, eval_every=50)
        c.data = reward_config.data(seq_len=64, k=4)
    elif preset in ("llama-7b", "bloom-7b1", "glm-6b"):
        # DPO paper: lr 1e-6, batch 64, RMSprop with 150 warmup steps; AdamW here, as TRL.
        c = common.base(model_preset=preset, steps=1000, batch_size=64, lr=1e-6, warmup_steps=150,
                        checkpoint_every=200, log_every=10, eval_every=200)
        c.data = reward_config.data(seq_len=1024, k=4)
        c.model.overrides.dtype = "bfloat16"  # bf16 matmuls, f32 params, norms and losses
        c.model.overrides.remat = "full"  # recompute each block in the backward pass
    else:
        raise ValueError(f"unknown dpo preset {preset!r}; choose one of {PRESETS}")
    c.optim.weight_decay = 0.0
    c.dpo = common.from_dataclass(DPOConfig)  # beta, label smoothing (rl.dpo.DPOConfig documents them)
    return c
