"""Wall time of one GRPO iteration (sampling + scoring + update) here and in TRL's GRPOTrainer, same sizes.

  .venv/bin/python bench/grpo_step.py [--prompts 8 --group 8 --prompt_len 32 --response_len 32 --iters 3]

Both sides: a LLaMA-style policy, frozen reference and reward model (scalar head) of the same shape; `prompts`
prompts of P tokens, G = `group` samples of each; N sampled tokens per sample (no stop token, so every
response has N tokens) at temperature 0.7 with log-probs recomputed at it; K-V-cached generation; the
reward model scores every sample; advantages `(r - mean) / (std + 1e-4)` per group; then `epochs` passes
over `mini_batches` mini-batches of the clipped (0.2) objective, its per-sequence token means averaged
(GRPO paper; TRL `loss_type="grpo"`), plus 0.04 x the k3 KL to the reference in the loss; AdamW. Ours:
`rl.ppo_step` with `RLConfig(algorithm="grpo")` (two jitted calls). TRL: `trl.GRPOTrainer` (PyTorch,
`transformers` LlamaForCausalLM, reward_funcs a LlamaForSequenceClassification) on CPU, without vLLM.

How the updates are matched: ours takes `epochs * mini_batches` optimiser steps on `prompts * G / mini_batches`
rows each. TRL: `num_iterations=epochs`, `steps_per_generation=mini_batches`, `per_device_train_batch_size =
prompts * G / mini_batches`, `gradient_accumulation_steps=1`, so one generation of `prompts * G` samples feeds
`epochs * mini_batches` trainer steps of one optimiser step each; those steps make one TRL iteration. TRL's
default gradient checkpointing is turned off (ours recomputes nothing either). Not matched: TRL shuffles the
rows once per generation and reuses the same mini-batches each epoch (ours reshuffles every epoch); with
`epochs * mini_batches == 1` TRL skips the old-policy forward (ours always runs it); TRL decodes samples
to text and re-tokenises them for the reward model and logs metrics with host syncs every step (part of
its cost, kept). TRL's EOS id lies outside the model's vocabulary, so it is
never sampled, as ours has none. Reports the median and minimum over `iters` iterations after one warm-up
iteration (which includes compilation), the speed-up, and the share of each iteration spent generating
(ours: the `rollout` call; TRL: the policy's `generate`). On a loaded machine use `--single_thread`: PyTorch's
threads slow down far more than XLA's when the cores are oversubscribed. Needs `pip install trl==0.29.1`.
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

KL_COEF, CLIP, TEMPERATURE, LR = 0.04, 0.2, 0.7, 1e-6  # GRPO paper's beta; TRL's epsilon and learning rate


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    rl_timing.add_model_args(p)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8, help="G, samples per prompt")
    p.add_argument("--epochs", type=int, default=1, help="passes over each rollout batch (GRPO's mu; TRL 1)")
    a = p.parse_args()
    if (a.prompts * a.group) % a.mini_batches:
        p.error(f"--prompts x --group = {a.prompts * a.group} samples must split into --mini_batches={a.mini_batches}")
    return a


def bench_ours(a):
    import jax
    import numpy as np
    import optax

    from lm import sharding
    from lm.model import init_params
    from rl import ppo_step as pt
    from rl import reward
    from rl.algorithms import RLConfig

    cfg = rl_timing.model_config(a)
    hp = pt.PPOConfig(response_length=a.response_len, temperature=TEMPERATURE, epochs=a.epochs,
                      mini_batches=a.mini_batches, kl_coef=KL_COEF, clip=CLIP)
    alg = RLConfig(algorithm="grpo", group_size=a.group, loss_agg="seq_mean")
    roles = pt.Roles(cfg, has_critic=False)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    tx = optax.adamw(LR, eps=1e-8, weight_decay=0.0)  # TRL: AdamW (Trainer default)
    _, sh, fsh = pt.state_shardings(roles, tx, mesh)
    sft = jax.jit(lambda r: init_params(cfg, r))(jax.random.PRNGKey(0))
    rm = reward.init_from_sft(cfg, sft, jax.random.PRNGKey(1))
    state = pt.init_state(sft, None, tx, hp.kl_coef, jax.random.PRNGKey(2), sh)
    frozen = {"ref": sft, "reward": rm}
    steps = pt.make_steps(roles, hp, tx, sh, fsh, mesh, eos_id=None, pad_id=0, alg=alg)
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, a.vocab, size=(a.prompts, a.prompt_len)).astype(np.int32)
    lengths = np.full((a.prompts,), a.prompt_len, np.int32)
    return rl_timing.time_ours(steps, state, frozen, prompts, lengths, a.iters)


def _tokenizer(vocab: int):
    """Word-level: "w<i>" is id i, but "<pad>" is 0 and "<unk>" 1 (special tokens split any word they start, so
    not "w1"); "</s>" is `vocab`, outside the model's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(2, vocab)}
    words["<pad>"], words["<unk>"], words["</s>"] = 0, 1, vocab
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   padding_side="left")


def bench_trl(a):
    import numpy as np
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    import trl
    from trl import GRPOConfig, GRPOTrainer

    hf = rl_timing.hf_config(a, eos_token_id=None, bos_token_id=None)
    reward_model = LlamaForSequenceClassification(LlamaConfig(**{**hf.to_dict(), "num_labels": 1}))
    tok = _tokenizer(a.vocab)
    rng = np.random.default_rng(0)
    n_rows = a.prompts * (a.iters + 1)
    # The trailing space keeps TRL's `prompt + completion` text for the reward model P + N words.
    prompts = [" ".join(f"w{i}" for i in row) + " "
               for row in rng.integers(3, a.vocab, size=(n_rows, a.prompt_len))]
    data = Dataset.from_dict({"prompt": prompts})
    samples = a.prompts * a.group
    per_iter_steps = a.epochs * a.mini_batches

    gen_times, step_ends = [], []

    with tempfile.TemporaryDirectory() as tmp:
        # GRPOTrainer loads its reference from the policy's path: save a random init and pass the path.
        LlamaForCausalLM(hf).save_pretrained(os.path.join(tmp, "policy"))
        args = GRPOConfig(output_dir=os.path.join(tmp, "out"), per_device_train_batch_size=samples // a.mini_batches,
                          steps_per_generation=a.mini_batches, gradient_accumulation_steps=1,
                          num_iterations=a.epochs, num_generations=a.group, max_completion_length=a.response_len,
                          temperature=TEMPERATURE, top_k=0, top_p=1.0, beta=KL_COEF, epsilon=CLIP,
                          loss_type="grpo", scale_rewards="group", learning_rate=LR, gradient_checkpointing=False,
                          max_steps=(a.iters + 1) * per_iter_steps, use_vllm=False,
                          model_init_kwargs={"device_map": None}, report_to="none", save_strategy="no",
                          logging_steps=10**6, use_cpu=True, bf16=False, disable_tqdm=True,
                          dataloader_num_workers=0, seed=0)
        trainer = GRPOTrainer(model=os.path.join(tmp, "policy"), reward_funcs=reward_model, args=args,
                              train_dataset=data, processing_class=tok, reward_processing_classes=tok,
                              callbacks=[rl_timing.step_timer(step_ends)])
        trainer.model.generate = rl_timing.timed(trainer.model.generate, gen_times)
        t_start = time.perf_counter()
        trainer.train()
    assert len(step_ends) == (a.iters + 1) * per_iter_steps and len(gen_times) == a.iters + 1, \
        (len(step_ends), len(gen_times))
    ends = [t_start] + step_ends[per_iter_steps - 1::per_iter_steps]
    per_iter = [ends[i + 1] - ends[i] for i in range(a.iters + 1)]
    print(f"trl {trl.__version__}: first iteration {per_iter[0]:.1f} s")
    return per_iter[1:], gen_times[1:]


def main():
    a = parse_args()
    rl_timing.main(a, f"prompts={a.prompts} group={a.group} epochs={a.epochs}", bench_ours, bench_trl,
                   "TRL GRPOTrainer")


if __name__ == "__main__":
    main()
