"""Throughput of one full AdamW training step: our jitted JAX step vs HF transformers' PyTorch LlamaForCausalLM.

  python bench/train_step.py [--rounds=5] [--steps=2] [--single_thread]

Same model (LLaMA-style: 4 layers, d_model 512, 8 heads, SwiGLU 1376, vocab 32000, untied head), batch
8 x 256 tokens, float32, the same masked next-token loss, global-norm clipping at 1.0 and AdamW with
weight decay on matrices only; PyTorch runs eagerly, as HF training loops do. Both run on this machine's
CPU in one process; measurements alternate between them so that other load on the machine hits both
alike, and medians are reported.

MFU = model FLOPs per second / this machine's measured peak: the faster of a 4096 x 4096 float32 matmul
in XLA and in PyTorch, timed in the same rounds. Model FLOPs per token: 6 N (N = parameters in matmuls,
the output head included, the embedding lookup not) + 12 L d T for attention (PaLM's count). Both MFU
figures are given: from wall-clock time, and from process CPU time (FLOPs per CPU-second against the
matmul's FLOPs per CPU-second), which stays meaningful when other jobs share the cores. On a busy
machine, `--single_thread` (one core, one compute thread on both sides) gives the steadiest comparison.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from configs import common  # noqa: E402
from lm import losses, optim, presets, sharding, train_step  # noqa: E402
from lm.model import Transformer, boxed_params  # noqa: E402

LAYERS, D, HEADS, FF, VOCAB, SEQ, BATCH = 4, 512, 8, 1376, 32000, 256, 8
LR, WARMUP, TOTAL = 3e-4, 10, 1000


def make_batch(seed=0):
    rs = np.random.RandomState(seed)
    tokens = rs.randint(0, VOCAB, (BATCH, SEQ + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((BATCH, SEQ), np.float32)}


def model_flops_per_step() -> float:
    matmul_params = LAYERS * (4 * D * D + 3 * D * FF) + D * VOCAB
    return BATCH * SEQ * (6 * matmul_params + 12 * LAYERS * D * SEQ)


def jax_runner(batch):
    cfg = presets.get("llama-tiny", vocab_size=VOCAB, d_model=D, n_layers=LAYERS, n_heads=HEADS, n_kv_heads=HEADS,
                      d_ff=FF, max_len=SEQ, norm_eps=1e-6)
    model = Transformer(cfg)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    ocfg = common.optim(LR, WARMUP)
    tx, lr = optim.make_optimizer(ocfg, TOTAL)
    build = functools.partial(boxed_params, cfg)
    state, shardings = train_step.init_state(build, tx, jax.random.PRNGKey(0), mesh)
    step = train_step.make_train_step(losses.lm_loss_fn(model), tx, shardings, mesh, lr_schedule=lr)
    gbatch = sharding.global_batch(batch, mesh)
    holder = {"state": state}

    def run(n):
        state = holder["state"]
        t, c = time.perf_counter(), time.process_time()
        for _ in range(n):
            state, m = step(state, gbatch)
        loss = float(m["loss"])
        holder["state"] = state
        return ((time.perf_counter() - t) / n, (time.process_time() - c) / n), loss

    return run


def torch_runner(batch):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    hf = LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
                     num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=SEQ,
                     rms_norm_eps=1e-6, tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(hf).train()
    decay = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "embed_tokens" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / WARMUP, 1.0))
    inputs, targets = torch.from_numpy(batch["inputs"]).long(), torch.from_numpy(batch["targets"]).long()
    mask = torch.from_numpy(batch["loss_mask"])

    def step():
        logits = model(input_ids=inputs).logits
        nll = torch.nn.functional.cross_entropy(logits.float().view(-1, VOCAB), targets.view(-1), reduction="none")
        loss = (nll * mask.view(-1)).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def run(n):
        t, c = time.perf_counter(), time.process_time()
        for _ in range(n):
            loss = step()
        return ((time.perf_counter() - t) / n, (time.process_time() - c) / n), float(loss.detach())

    return run


def matmul_runners(n=4096):
    """`{name: run}` timing one n x n float32 matmul in XLA and in PyTorch; run() -> (wall s, CPU s)."""
    a = np.random.RandomState(0).randn(n, n).astype(np.float32)
    ja, ta = jnp.asarray(a), torch.from_numpy(a)
    f = jax.jit(lambda x: x @ x)
    f(ja).block_until_ready()
    return {"matmul xla": lambda: _timed(lambda: f(ja).block_until_ready()),
            "matmul torch": lambda: _timed(lambda: ta @ ta)}


def _timed(fn) -> tuple[float, float]:
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternating measurement rounds")
    parser.add_argument("--steps", type=int, default=2, help="steps timed per round and framework")
    parser.add_argument("--single_thread", action="store_true",
                        help="pin to one core with one compute thread on both sides (steadier on a busy machine)")
    args = parser.parse_args()
    if args.single_thread:  # before the XLA backend starts: it sizes its thread pool from the affinity
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        torch.set_num_threads(1)
    batch = make_batch()
    print(f"devices: {jax.devices()}  threads: torch {torch.get_num_threads()}, "
          f"cores usable {len(os.sched_getaffinity(0))} of {os.cpu_count()}")
    t = time.perf_counter()
    runs = {"jax": jax_runner(batch)}
    runs["jax"](1)  # compile
    print(f"jax: init + compile + first step {time.perf_counter() - t:.1f} s")
    runs["torch"] = torch_runner(batch)
    runs["torch"](1)  # warm-up
    matmuls = matmul_runners()
    n = 4096
    wall = {k: [] for k in (*runs, *matmuls)}
    cpu = {k: [] for k in wall}
    for r in range(args.rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in order:
            (sec, cpu_sec), loss = runs[name](args.steps)
            wall[name].append(sec)
            cpu[name].append(cpu_sec)
            print(f"round {r} {name:5s}: {sec:6.2f} s/step wall, {cpu_sec:6.2f} CPU-s/step, loss {loss:.4f}")
        for name, mm in matmuls.items():
            sec, cpu_sec = mm()
            wall[name].append(sec)
            cpu[name].append(cpu_sec)
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    mm_flops = 2 * n ** 3
    peak = max(mm_flops / med[k] for k in matmuls)
    peak_cpu = max(mm_flops / med_cpu[k] for k in matmuls)
    flops, tokens = model_flops_per_step(), BATCH * SEQ
    print(f"\nmodel FLOPs per step: {flops / 1e9:.1f} G ({BATCH} x {SEQ} = {tokens} tokens)")
    for k in matmuls:
        print(f"f32 {n}x{n} {k:12s}: {mm_flops / med[k] / 1e9:6.1f} GFLOP/s wall, "
              f"{mm_flops / med_cpu[k] / 1e9:6.1f} GFLOP per CPU-s")
    print(f"\n{'':7s}{'s/step':>8s}{'tokens/s':>10s}{'GFLOP/s':>9s}{'MFU':>7s}{'CPU-s/step':>12s}{'MFU(CPU)':>10s}")
    for k in runs:
        fs = flops / med[k]
        print(f"{k:7s}{med[k]:8.2f}{tokens / med[k]:10.0f}{fs / 1e9:9.1f}{fs / peak:7.1%}{med_cpu[k]:12.2f}"
              f"{flops / med_cpu[k] / peak_cpu:10.1%}")
    print(f"\nratio jax / torch: {med['torch'] / med['jax']:.2f}x tokens/s (wall), "
          f"{med_cpu['torch'] / med_cpu['jax']:.2f}x per CPU-second")


if __name__ == "__main__":
    main()
