"""PPO configs: `python -m experiments.ppo --config=configs/ppo.py:PRESET --workdir=DIR
--config.init_from=SFT_WORKDIR --config.reward_from=REWARD_WORKDIR`.

Actor and reference start from the SFT run, the reward model comes from the reward run (normalised, see
rl.reward.load), the critic from the reward model or a zero head. `train.steps` counts PPO iterations and
`train.batch_size` prompts per iteration (one rollout batch); the optimiser takes `ppo.epochs *
ppo.mini_batches` steps per iteration. Presets: `tiny` (CPU), `llama-7b`, `bloom-7b1`, `glm-6b`.
"""
import ml_collections as mlc

from configs import common
from rl.algorithms import RLConfig
from rl.ppo_step import PPOConfig

PRESETS = ("tiny", "llama-7b", "bloom-7b1", "glm-6b")


def ppo(**values):
    """The recipe: every field of rl.ppo_step.PPOConfig (whose docstring gives each TRL / InstructGPT choice)."""
    return common.from_dataclass(PPOConfig, **values)


def rl(**values):
    """The algorithm (rl.algorithms.RLConfig): `--config.rl.algorithm=grpo|rloo|remax|reinforce_pp|best_of_n|
    online_dpo` runs that method with the `ppo` section's sampling, clipping, epochs and KL coefficient.

    Recipe defaults of the field, for `--config.rl.*` / `--config.ppo.*` (configs/pipeline.py uses them):
      GRPO (Shao et al. 2024): group_size 64 in the paper, 8 in TRL; scale_rewards; loss_agg seq_mean (paper;
        TRL's default is now token_mean); kl_in loss with kl_coef 0.04 (paper; TRL 0.0); ppo.epochs 1 (mu=1).
      Dr. GRPO (Liu et al. 2025): scale_rewards False, loss_agg seq_sum, kl_coef 0.
      DAPO (Yu et al. 2025): clip 0.2 / clip_high 0.28, loss_agg token_mean, filter_ties, kl_coef 0.
      RLOO (Ahmadian et al. 2024): group_size 4 (TRL 2), KL in the reward (TRL kl beta 0.05).
      ReMax (Li et al. 2023): one sample and one greedy response per prompt, KL in the reward.
      REINFORCE++ (Hu 2025): one sample per prompt, k1 KL in the reward (kl_coef 0.01), returns whitened over
        the batch.
      Best-of-n / rejection sampling (Llama 2; RAFT, Dong et al. 2023): group_size 8, ppo.epochs 1.
      Online DPO (Guo et al. 2024): group_size 2, dpo_beta 0.1.
    """
    return common.from_dataclass(RLConfig, **values)


def data(prompt_len: int):
    c = mlc.ConfigDict()
    c.path = "data/qa/rl_prompts.jsonl"  # prompt rows ({"prompt"}, {"messages"}, or any SFT/preference file)
    c.tokenizer = ""  # a .model file or a tokenizer directory; "" = the init_from run's or HF directory's own
    c.chat_template = ""  # "" = the tokenizer's own; "chatml" or a Jinja file (for checkpoints that ship none)
    c.field_map = ""  # rename the file's columns to a known schema, e.g. "question=prompt,answer=response"
    c.prompt_len = prompt_len  # prompt width: formatted prompts are right-padded to it (longer is an error)
    return c


def ptx(seq_len: int, batch_size: int):
    c = mlc.ConfigDict()
    c.path = "data/text"  # pretraining text for PPO-ptx (a .txt file or a directory); used when ptx_coef > 0
    c.objective = "causal"  # "causal" or "glm", as the model was pretrained
    c.seq_len = seq_len  # tokens per pretraining row
    c.batch_size = batch_size  # pretraining rows per iteration, split over the mini-batches
    c.eval_fraction = 0.05  # documents held out as in pretraining (data.eval_fraction there): ptx trains on the rest
    c.cache_dir = ""  # prepared datasets; "" = $LM_DATA_CACHE or ~/.cache/chatgpt-jax/tfds
    return c


def get_config(preset: str = "tiny"):
    """The PPO config of `preset` (one of PRESETS)."""
    if preset == "tiny":
        c = common.base(model_preset="llama-tiny", steps=60, batch_size=16, lr=1e-4, warmup_steps=10,
                        checkpoint_every=20, log_every=1, eval_every=0)
        c.ppo = ppo(response_length=24)  # the recipe (rl.ppo_step.PPOConfig documents each field)
        c.ppo.mini_batches = 2
        c.data = data(prompt_len=32)
        c.ptx = ptx(seq_len=64, batch_size=8)
    elif preset in ("llama-7b", "bloom-7b1", "glm-6b"):
        # Four 7B models under one FSDP mesh: actor and critic with AdamW (f32 params + 2 moments) and the
        # frozen reference and reward model, about 230 GB of state before activations (e.g. a v4-64 or 8x H100).
        c = common.base(model_preset=preset, steps=1000, batch_size=512, lr=3e-6, warmup_steps=50,
                        checkpoint_every=50, log_every=1, eval_every=0, mesh_shape=(1, -1, 1))
        c.ppo = ppo(response_length=256)  # the recipe (rl.ppo_step.PPOConfig documents each field)
        c.ppo.mini_batches = 8
        c.ppo.kl_coef = 0.02  # InstructGPT
        c.data = data(prompt_len=512)
        c.ptx = ptx(seq_len=2048, batch_size=64)
        c.model.overrides.dtype = "bfloat16"  # bf16 matmuls, f32 params, norms and losses
        c.model.overrides.remat = "full"  # recompute each block in the backward pass
    else:
        raise ValueError(f"unknown ppo preset {preset!r}; choose one of {PRESETS}")
    c.rl = rl()  # the algorithm, PPO by default (rl.algorithms.RLConfig; recipe defaults of each in rl())
    c.optim.weight_decay = 0.0
    c.reward_from = ""  # the reward-model run (its latest checkpoint and reward_norm.json)
    c.reward_normalize = True  # apply the reward run's score normalisation (mean 0, std 1 on SFT samples)
    # Critic: trunk and head from the reward model (InstructGPT), or "zeros" (SFT trunk, zero head).
    c.critic_init = "reward"
    return c
