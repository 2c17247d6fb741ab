"""PPO configs: `python -m experiments.ppo --config=configs/ppo.py:PRESET --workdir=DIR
--config.init_from=SFT_WORKDIR --config.reward_from=REWARD_WORKDIR`.

Actor and reference start from the SFT run, the reward model comes from the reward run (normalised, see
rl.reward.load), the critic from the reward model or a zero head. `train.steps` counts PPO iterations and
`train.batch_size` prompts per iteration (one rollout batch); the optimiser takes `ppo.epochs *
ppo.mini_batches` steps per iteration. Presets: `tiny` (CPU), `llama-7b`, `bloom-7b1`, `glm-6b`.
"""
import ml_collections as mlc

from configs import common

PRESETS = ("tiny", "llama-7b", "bloom-7b1", "glm-6b")


def ppo(response_length: int):
    """The recipe (rl.ppo_trainer.PPOConfig); each comment gives the TRL / InstructGPT choice."""
    c = mlc.ConfigDict()
    c.response_length = response_length  # tokens sampled per prompt (TRL: 53)
    c.temperature = 0.7  # sampling temperature, log-probs recomputed at it (TRL: 0.7; InstructGPT: 1.0)
    c.kl_coef = 0.05  # per-token KL penalty beta to the SFT reference (TRL: 0.05; InstructGPT: 0.02)
    c.kl_estimator = "k1"  # "k1" log-ratio (TRL default) or "k3" (non-negative, unbiased; TRL option)
    c.adaptive_kl = False  # Ziegler et al.'s adaptive beta (TRL: fixed; Ziegler et al. 2019: adaptive)
    c.kl_target = 6.0  # adaptive KL: target KL per sequence, nats (Ziegler et al.: 6)
    c.kl_horizon = 10000.0  # adaptive KL: horizon in sequences (Ziegler et al.: 10000)
    c.gamma = 1.0  # discount (TRL: 1.0)
    c.lam = 0.95  # GAE lambda (TRL: 0.95)
    c.clip = 0.2  # policy ratio clip (TRL: 0.2)
    c.value_clip = 0.2  # value clip range (TRL: 0.2)
    c.vf_coef = 0.1  # value-loss weight (TRL: 0.1)
    c.ent_coef = 0.0  # entropy bonus (TRL: none)
    c.epochs = 4  # PPO epochs per rollout batch (TRL: 4; DeepSpeed-Chat: 1)
    c.mini_batches = 1  # mini-batches per epoch (TRL: 1)
    c.whiten_advantages = True  # normalise advantages per batch (TRL: yes; DeepSpeed-Chat: no)
    c.whiten_rewards = False  # normalise per-token rewards before GAE (TRL: no)
    c.missing_eos_penalty = 0.0  # subtracted from the score of a response without EOS (TRL: None = 0)
    c.score_clip = 0.0  # clip reward-model scores to +-score_clip (DeepSpeed-Chat: 5; 0 = off)
    c.ptx_coef = 0.0  # PPO-ptx: weight of the pretraining loss (InstructGPT: 27.8; 0 = plain PPO)
    c.max_bad_iterations = 3  # stop after this many iterations in a row with non-finite loss/rewards
    return c


def data(prompt_len: int):
    c = mlc.ConfigDict()
    c.path = "data/qa/rl_prompts.jsonl"  # JSONL of {"prompt": ...} rows, one rollout prompt each
    c.tokenizer = ""  # SentencePiece .model; "" = the init_from run's WORKDIR/tokenizer.model
    c.prompt_len = prompt_len  # prompt width: formatted prompts are right-padded to it (longer is an error)
    return c


def ptx(seq_len: int, batch_size: int):
    c = mlc.ConfigDict()
    c.path = "data/text"  # pretraining text for PPO-ptx (a .txt file or a directory); used when ptx_coef > 0
    c.objective = "causal"  # "causal" or "glm", as the model was pretrained
    c.seq_len = seq_len  # tokens per pretraining row
    c.batch_size = batch_size  # pretraining rows per iteration, split over the mini-batches
    c.cache_dir = ""  # prepared datasets; "" = $LM_DATA_CACHE or ~/.cache/chatgpt-jax/tfds
    return c


def get_config(preset: str = "tiny"):
    """The PPO config of `preset` (one of PRESETS)."""
    if preset == "tiny":
        c = common.base(model_preset="llama-tiny", steps=60, batch_size=16, lr=1e-4, warmup_steps=10,
                        checkpoint_every=20, log_every=1, eval_every=0)
        c.ppo = ppo(response_length=24)
        c.ppo.mini_batches = 2
        c.data = data(prompt_len=32)
        c.ptx = ptx(seq_len=64, batch_size=8)
    elif preset in ("llama-7b", "bloom-7b1", "glm-6b"):
        # Four 7B models under one FSDP mesh: actor and critic with AdamW (f32 params + 2 moments) and the
        # frozen reference and reward model, about 230 GB of state before activations (e.g. a v4-64 or 8x H100).
        c = common.base(model_preset=preset, steps=1000, batch_size=512, lr=3e-6, warmup_steps=50,
                        checkpoint_every=50, log_every=1, eval_every=0, mesh_shape=(1, -1, 1))
        c.ppo = ppo(response_length=256)
        c.ppo.mini_batches = 8
        c.ppo.kl_coef = 0.02  # InstructGPT
        c.data = data(prompt_len=512)
        c.ptx = ptx(seq_len=2048, batch_size=64)
        c.model.overrides.dtype = "bfloat16"  # bf16 matmuls, f32 params, norms and losses
        c.model.overrides.remat = "full"  # recompute each block in the backward pass
    else:
        raise ValueError(f"unknown ppo preset {preset!r}; choose one of {PRESETS}")
    c.optim.weight_decay = 0.0
    c.reward_from = ""  # the reward-model run (its latest checkpoint and reward_norm.json)
    c.reward_normalize = True  # apply the reward run's score normalisation (mean 0, std 1 on SFT samples)
    # Critic: trunk and head from the reward model (InstructGPT), or "zeros" (SFT trunk, zero head).
    c.critic_init = "reward"
    return c
