"""What bench/ppo_step.py and bench/grpo_step.py share: the model flags, timing our jitted rollout + learn,
timing TRL's trainer steps, and the report (medians, minima, generation share, speed-up)."""
from __future__ import annotations

import os
import statistics
import time


def add_model_args(p):
    """Model shape, lengths, mini-batches and run flags common to both RL benchmarks."""
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d_ff", type=int, default=256)
    p.add_argument("--scan_unroll", type=int, default=0,
                   help="our layer stack: layers per scan iteration, 0 = unrolled (as the *-tiny presets)")
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--response_len", type=int, default=32)
    p.add_argument("--mini_batches", type=int, default=2)
    p.add_argument("--iters", type=int, default=3, help="timed iterations after one warm-up")
    p.add_argument("--skip_trl", action="store_true")
    p.add_argument("--single_thread", action="store_true",
                   help="one compute thread on both sides (steadier figures on a busy machine)")


def model_config(a):
    from lm.config import ModelConfig
    return ModelConfig(vocab_size=a.vocab, d_model=a.d_model, n_layers=a.layers, n_heads=a.heads, d_ff=a.d_ff,
                       max_len=a.prompt_len + a.response_len, scan_unroll=a.scan_unroll)


def hf_config(a, **token_ids):
    """The transformers `LlamaConfig` of `model_config(a)`'s shape (pad id 0, `token_ids` for bos/eos), with torch
    seeded and, with --single_thread, on one thread: TRL's side of the comparison."""
    import torch
    from transformers import LlamaConfig

    torch.manual_seed(0)
    if a.single_thread:
        torch.set_num_threads(1)
    return LlamaConfig(vocab_size=a.vocab, hidden_size=a.d_model, intermediate_size=a.d_ff, num_hidden_layers=a.layers,
                       num_attention_heads=a.heads, num_key_value_heads=a.heads,
                       max_position_embeddings=a.prompt_len + a.response_len, rms_norm_eps=1e-6,
                       tie_word_embeddings=False, pad_token_id=0, **token_ids)


def time_ours(steps, state, frozen, prompts, lengths, iters: int):
    """`(total, generation)` seconds of `iters` rollout + learn iterations after a warm-up (compilation)."""
    import jax
    import numpy as np

    gen, total = [], []
    for i in range(iters + 1):
        t0 = time.perf_counter()
        out = jax.block_until_ready(steps.rollout(state.params, frozen, prompts, lengths,
                                                  jax.random.fold_in(jax.random.PRNGKey(3), i)))
        t1 = time.perf_counter()
        state, metrics = steps.learn(state, frozen, prompts, lengths, out)
        jax.block_until_ready((state, metrics))
        t2 = time.perf_counter()
        if i == 0:
            print(f"ours: warm-up iteration (with compilation) {t2 - t0:.1f} s")
            continue
        gen.append(t1 - t0)
        total.append(t2 - t0)
    assert np.isfinite(float(metrics["loss"])) and int(metrics["skipped_total"]) == 0
    return total, gen


def timed(fn, times: list):
    """`fn` wrapped to append the seconds of each call to `times` (TRL's generation)."""
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        times.append(time.perf_counter() - t0)
        return out
    return wrapper


def step_timer(ends: list):
    """A transformers TrainerCallback appending the time of every trainer step's end to `ends`."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):

        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    return StepTimer()


def report(name, total, gen):
    """Median and minimum iteration time (the minimum is the least disturbed by other load) and generation share."""
    med, gen_share = statistics.median(total), statistics.median(g / t for g, t in zip(gen, total))
    print(f"{name:16s} {med * 1e3:8.1f} ms / iteration (median; min {min(total) * 1e3:.1f}), "
          f"generating {gen_share:5.1%}")


def main(a, workload: str, bench_ours, bench_trl, peer: str):
    """Run both sides with the same flags and print each and the speed-up."""
    if a.single_thread:  # must be set before jax is imported
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                                   " intra_op_parallelism_threads=1")
    print(f"model: LLaMA-style d_model={a.d_model} layers={a.layers} heads={a.heads} d_ff={a.d_ff} "
          f"vocab={a.vocab}; {workload} prompt={a.prompt_len} response={a.response_len} "
          f"mini_batches={a.mini_batches}; {os.cpu_count()} CPU cores"
          + (", one thread each" if a.single_thread else ""))
    ours, ours_gen = bench_ours(a)
    report("ours (JAX)", ours, ours_gen)
    if a.skip_trl:
        return
    theirs, theirs_gen = bench_trl(a)
    report(peer, theirs, theirs_gen)
    print(f"speed-up: {statistics.median(theirs) / statistics.median(ours):.2f}x on medians, "
          f"{min(theirs) / min(ours):.2f}x on minima (goal >= 3x)")
