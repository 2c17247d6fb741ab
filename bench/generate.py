"""Greedy generation throughput: `lm.generate` (JAX, KV cache, one jitted decode loop) vs Hugging Face
PyTorch `generate` on CPU, with the same random LLaMA-style weights, measured side by side in one run.

    .venv/bin/python bench/generate.py            # 4 layers, d_model 256, 8 heads, vocab 32000, batch 8,
                                                  # prompt 32, 128 new tokens, greedy

Compile / warm-up time is reported separately and excluded from tokens/s. Both sides generate exactly
`--new` tokens per row (no eos; `min_new_tokens` on the HF side). Runs are interleaved (one of each side per
round) so both see the same machine load; the ratio uses each side's best run. HF runs with PyTorch's default
thread count and with one thread (the faster of the two on a busy machine). Token agreement between the two
greedy outputs is printed as a sanity check.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

import lm
from lm import hf


def _timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d_model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--d_ff", type=int, default=768, help="LLaMA's 8/3 * d_model rounded up to 256")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (one run of each side per round)")
    args = ap.parse_args()

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.d_ff,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(512, args.prompt + args.new), rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=0)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        cfg, params = hf.load(d)  # the same weights, converted by the project's importer
    params = jax.device_put(params)

    prompts = np.random.default_rng(0).integers(1, args.vocab, size=(args.batch, args.prompt))
    n_tokens = args.batch * args.new
    print(f"model: LLaMA-style {args.layers} layers, d_model {args.d_model}, {args.heads} heads, d_ff {args.d_ff}, "
          f"vocab {args.vocab} ({lm.count_params(cfg) / 1e6:.1f}M params, float32)")
    print(f"work: batch {args.batch}, prompt {args.prompt}, {args.new} new tokens, greedy; "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, {os.cpu_count()} CPUs")

    def run_jax():
        return lm.generate(cfg, params, prompts.tolist(), args.new)

    input_ids = torch.from_numpy(prompts)
    attention_mask = torch.ones_like(input_ids)
    default_threads = torch.get_num_threads()

    def run_hf(threads, n=args.new):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
        return out[:, args.prompt:].tolist()

    sides = {"lm.generate": run_jax, f"HF generate, {default_threads} threads": lambda: run_hf(default_threads)}
    if default_threads != 1:  # on a busy machine PyTorch's thread pool can be much slower than one thread
        sides["HF generate, 1 thread"] = lambda: run_hf(1)
    warm = {"lm.generate": _timed(run_jax, 1)[1][0], "HF": _timed(lambda: run_hf(default_threads, 8), 1)[1][0]}
    outs, times = {}, {k: [] for k in sides}
    for _ in range(args.repeats):  # interleaved, so every side sees the same machine load
        for name, fn in sides.items():
            outs[name], (t,) = _timed(fn, 1)
            times[name].append(t)

    jax_out, hf_out = outs["lm.generate"], outs[f"HF generate, {default_threads} threads"]
    assert all(len(r) == args.new for r in jax_out + hf_out), "both sides must generate every token"
    print(f"warm-up (compile, excluded): lm.generate {warm['lm.generate']:.2f} s, HF {warm['HF']:.2f} s")
    best = {}
    for name, ts in times.items():
        best[name] = n_tokens / min(ts)
        print(f"{name:28s} runs {', '.join(f'{t:.2f}' for t in ts)} s | best {best[name]:7.0f} tokens/s, "
              f"median {n_tokens / statistics.median(ts):7.0f} tokens/s")
    print(f"greedy token agreement with HF: {np.mean(np.asarray(jax_out) == np.asarray(hf_out)):.1%}")
    for name in list(sides)[1:]:
        print(f"ratio lm.generate / {name}: {best['lm.generate'] / best[name]:.2f}x (best runs)")


if __name__ == "__main__":
    main()
