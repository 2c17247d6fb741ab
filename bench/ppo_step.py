"""Wall time of one PPO iteration (rollout + scoring + update) here and in TRL's PPOTrainer, same sizes.

  .venv/bin/python bench/ppo_step.py [--batch 16 --prompt_len 32 --response_len 32 --iters 3]

Both sides: a LLaMA-style policy, frozen reference, reward model and value model of the same shape; B
prompts of P tokens; N sampled tokens each (no stop token, so every response has N tokens) at temperature
0.7 with log-probs recomputed at it; K-V-cached generation; then `epochs` PPO epochs over `mini_batches`
mini-batches with the same objective (clipped policy + 0.1 x clipped value loss, k1 KL penalty, GAE,
whitened advantages) and AdamW. Ours: `rl.ppo_step` (two jitted calls). TRL: `trl.experimental.ppo.
PPOTrainer` (PyTorch, `transformers` LlamaForCausalLM / LlamaForSequenceClassification) on CPU. Reports the
median and minimum over `iters` iterations after one warm-up iteration (which includes compilation), the
speed-up, and the share of each iteration spent generating. Needs `pip install trl==0.29.1`: its PPOTrainer
lives in `trl.experimental.ppo`, and trl 1.16 has none.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rl_timing  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    rl_timing.add_model_args(p)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--epochs", type=int, default=4)
    return p.parse_args()


def bench_ours(a):
    import jax
    import numpy as np
    import optax

    from lm import sharding
    from lm.model import init_params
    from rl import ppo_step as pt
    from rl import reward

    cfg = rl_timing.model_config(a)
    hp = pt.PPOConfig(response_length=a.response_len, temperature=0.7, epochs=a.epochs, mini_batches=a.mini_batches)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    tx = optax.adamw(3e-6, eps=1e-8, weight_decay=0.0)  # TRL: AdamW (Trainer default), lr 3e-6
    _, sh, fsh = pt.state_shardings(cfg, tx, mesh)
    sft = jax.jit(lambda r: init_params(cfg, r))(jax.random.PRNGKey(0))
    rm = reward.init_from_sft(cfg, sft, jax.random.PRNGKey(1))
    state = pt.init_state(sft, rm, tx, hp.kl_coef, jax.random.PRNGKey(2), sh)
    frozen = {"ref": sft, "reward": rm}
    steps = pt.make_steps(cfg, hp, tx, sh, fsh, mesh, eos_id=None, pad_id=0)
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, a.vocab, size=(a.batch, a.prompt_len)).astype(np.int32)
    lengths = np.full((a.batch,), a.prompt_len, np.int32)
    return rl_timing.time_ours(steps, state, frozen, prompts, lengths, a.iters)


def _tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab)}
    words["<pad>"], words["</s>"] = 0, 2  # ids 0 and 2, as in our runs (they replace w0 and w2)
    del words["w0"], words["w2"]
    tok = Tokenizer(models.WordLevel(words, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="w1",
                                   padding_side="left")


def bench_trl(a):
    import numpy as np
    from datasets import Dataset
    from transformers import (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification)

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import trl
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    hf = rl_timing.hf_config(a, eos_token_id=2, bos_token_id=1)
    policy, ref = LlamaForCausalLM(hf), LlamaForCausalLM(hf)
    ref.load_state_dict(policy.state_dict())
    hf_rm = LlamaConfig(**{**hf.to_dict(), "num_labels": 1})
    reward_model, value_model = LlamaForSequenceClassification(hf_rm), LlamaForSequenceClassification(hf_rm)
    tok = _tokenizer(a.vocab)
    rng = np.random.default_rng(0)
    n_rows = a.batch * (a.iters + 1)
    ids = rng.integers(3, a.vocab, size=(n_rows, a.prompt_len)).tolist()
    data = Dataset.from_dict({"input_ids": ids})

    gen_times, step_ends = [], []
    original = trl_ppo.batch_generation
    trl_ppo.batch_generation = rl_timing.timed(original, gen_times)
    with tempfile.TemporaryDirectory() as out_dir:
        args = PPOConfig(output_dir=out_dir, per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
                         local_rollout_forward_batch_size=a.batch, num_mini_batches=a.mini_batches,
                         num_ppo_epochs=a.epochs, response_length=a.response_len, temperature=0.7,
                         total_episodes=n_rows, learning_rate=3e-6, kl_coef=0.05, kl_estimator="k1",
                         stop_token=None, missing_eos_penalty=None, num_sample_generations=0, report_to="none",
                         save_strategy="no", logging_steps=1000, use_cpu=True, bf16=False, disable_tqdm=True,
                         dataloader_num_workers=0, seed=0)
        trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward_model,
                             value_model=value_model, train_dataset=data, eval_dataset=data,
                             callbacks=[rl_timing.step_timer(step_ends)])
        t_start = time.perf_counter()
        trainer.train()
    trl_ppo.batch_generation = original
    ends = [t_start] + step_ends
    per_iter = [ends[i + 1] - ends[i] for i in range(len(step_ends))]
    print(f"trl {trl.__version__}: first iteration {per_iter[0]:.1f} s")
    return per_iter[1:], gen_times[1:]


def main():
    a = parse_args()
    rl_timing.main(a, f"batch={a.batch} epochs={a.epochs}", bench_ours, bench_trl, "TRL PPOTrainer")


if __name__ == "__main__":
    main()
