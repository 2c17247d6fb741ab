"""Greedy decode throughput against the memory-bandwidth bound, and against Hugging Face PyTorch `generate`, with
the same random LLaMA-style weights, measured side by side in one run.

    .venv/bin/python bench/generate.py            # 4 layers, d_model 256, 8 heads, vocab 32000, batch 8,
                                                  # prompt 32, 128 new tokens, greedy

A decode step reads every weight once (all but the token embedding, of which it gathers B rows) and the KV cache
up to each row's position: that many bytes over the machine's read bandwidth is the least a step can take. The
bound uses two probes run here: one NumPy pass over 64 MB (one thread) and an XLA sum over the same array (all
threads); shares are given against both. `lm.generate` runs with float32, bfloat16, int8 and int4 weights
(`lm.quantize`: layer projections in blocks of 64 with float32 scales; embeddings, norms and head as they are)
and w8a8 (int8 weights per output column times int8 activations), "+head" quantising the output head too; each
format's bytes per step come from its own parameters.

Compile / warm-up time is excluded. Both sides generate exactly `--new` tokens per row (no eos; `min_new_tokens`
on the HF side). Runs are interleaved (one of each side per round) so all see the same machine load; rates use
each side's best run. HF runs in float32 with PyTorch's default thread count and with one thread. Greedy token
agreement is printed as a check: HF against our float32, each format against our float32, and our unstacked
decode layout against the stacked one (the same tokens are required for float32 and bfloat16).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

import lm
from lm import hf
from lm.generation import bucket_length, sample

PROBE_BYTES = 64 * 2**20


def _timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, times


def read_bandwidth(rounds: int = 10) -> dict:
    """Bytes/s of reading 64 MB: one NumPy pass (one thread), two NumPy halves on two threads, and an XLA sum
    (XLA:CPU's threads); the best of `rounds` each."""
    x = np.random.default_rng(0).random(PROBE_BYTES // 4, dtype=np.float32)
    halves = np.split(x, 2)
    xj = jnp.asarray(x)
    xla_sum = jax.jit(lambda a: jnp.sum(a.reshape(16, -1), axis=1))
    xla_sum(xj).block_until_ready()

    def threads():
        ts = [threading.Thread(target=np.sum, args=(h,)) for h in halves]
        [t.start() for t in ts]
        [t.join() for t in ts]

    probes = {"numpy, 1 thread": lambda: x.sum(), "numpy, 2 threads": threads,
              "XLA sum": lambda: xla_sum(xj).block_until_ready()}
    return {name: PROBE_BYTES / min(_timed(fn, rounds)[1]) for name, fn in probes.items()}


def step_bytes(cfg, params, batch: int, prompt: int, new: int) -> float:
    """Bytes a decode step must read, averaged over the `new` steps: every parameter but the token embedding
    (B of its rows), and K and V of each layer up to each row's position."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    weights = sum(x.size * x.dtype.itemsize for path, x in leaves
                  if not (jax.tree_util.keystr(path).startswith("['embed']") and not cfg.tie_embeddings))
    embed = params["embed"]["embedding"]
    rows = batch * embed.shape[1] * embed.dtype.itemsize
    mean_len = prompt + (new + 1) / 2
    cache = 2 * cfg.n_layers * batch * cfg.kv_heads * cfg.dim_per_head * mean_len * jnp.dtype(cfg.compute_dtype).itemsize
    return weights + rows + cache


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
    ap.add_argument("--formats", default="float32,bfloat16,int8,int4,w8a8,w8a8+head",
                    help="float32, bfloat16, or a lm.quantize format, '+head' to quantise the output head too")
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
    models = {}
    for fmt in args.formats.split(","):
        if fmt in ("float32", "bfloat16"):
            c = cfg.replace(dtype=fmt, param_dtype=fmt)
            models[fmt] = (c, jax.tree.map(lambda a, t=jnp.dtype(fmt): a.astype(t), params))
        else:
            name, _, head = fmt.partition("+")
            models[fmt] = lm.quantize(cfg, params, name, head=head == "head")

    prompts = np.random.default_rng(0).integers(1, args.vocab, size=(args.batch, args.prompt))
    n_tokens = args.batch * args.new
    print(f"model: LLaMA-style {args.layers} layers, d_model {args.d_model}, {args.heads} heads, d_ff {args.d_ff}, "
          f"vocab {args.vocab} ({lm.count_params(cfg) / 1e6:.1f}M params)")
    print(f"work: batch {args.batch}, prompt {args.prompt}, {args.new} new tokens, greedy; "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, {os.cpu_count()} CPUs")

    width = bucket_length(args.prompt)

    def ours(fmt, unstack=None):
        c, p = models[fmt]
        tokens = np.zeros((args.batch, width), np.int32)
        tokens[:, :args.prompt] = prompts
        lengths = np.full((args.batch,), args.prompt, np.int32)

        def run():
            out = sample(c, p, tokens, lengths, jax.random.key(0), max_new_tokens=args.new,
                                       temperature=0.0, unstack=unstack, logprobs=False)
            return np.asarray(out.tokens)
        return run

    input_ids = torch.from_numpy(prompts)
    attention_mask = torch.ones_like(input_ids)
    default_threads = torch.get_num_threads()

    def run_hf(threads, n=args.new):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
        return out[:, args.prompt:].numpy()

    hf_names = [f"HF float32, {default_threads} threads"] + (["HF float32, 1 thread"] if default_threads != 1 else [])
    sides = {f"ours {fmt}": ours(fmt) for fmt in models}
    sides.update({hf_names[0]: lambda: run_hf(default_threads)})
    if len(hf_names) > 1:  # on a busy machine PyTorch's thread pool can be much slower than one thread
        sides[hf_names[1]] = lambda: run_hf(1)
    warm = {name: _timed(fn, 1)[1][0] for name, fn in sides.items()}
    outs, times = {}, {k: [] for k in sides}
    for _ in range(args.repeats):  # interleaved, so every side sees the same machine load
        for name, fn in sides.items():
            outs[name], (t,) = _timed(fn, 1)
            times[name].append(t)
    bandwidth = read_bandwidth()

    print("warm-up (compile, excluded): " + ", ".join(f"{k} {v:.2f} s" for k, v in warm.items()))
    print("read bandwidth: " + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in bandwidth.items()))
    one, best_bw = bandwidth["numpy, 1 thread"], max(bandwidth.values())
    print(f"{'side':28s} {'MB/step':>8s} {'ms/step':>8s} {'tokens/s':>9s} {'median':>9s} {'GB/s':>6s} "
          f"{'% bound (1 thread)':>19s} {'% bound (best probe)':>21s}")
    best = {}
    for name, ts in times.items():
        best[name] = n_tokens / min(ts)
        ms = 1e3 * min(ts) / args.new
        line = f"{name:28s} "
        fmt = name.split()[1] if name.startswith("ours") else None
        if fmt:
            b = step_bytes(*models[fmt], args.batch, args.prompt, args.new)
            rate = b / (ms / 1e3)
            line += f"{b / 1e6:8.1f} {ms:8.2f} {best[name]:9.0f} {n_tokens / statistics.median(ts):9.0f} " \
                    f"{rate / 1e9:6.1f} {100 * rate / one:18.0f}% {100 * rate / best_bw:20.0f}%"
        else:
            line += f"{'':8s} {ms:8.2f} {best[name]:9.0f} {n_tokens / statistics.median(ts):9.0f}"
        print(line)
    ref = outs["ours float32"] if "ours float32" in outs else None
    if ref is not None:
        print(f"greedy token agreement with ours float32: HF {np.mean(outs[hf_names[0]] == ref):.1%}, " + ", ".join(
            f"{fmt} {np.mean(outs[f'ours {fmt}'] == ref):.1%}" for fmt in models if fmt != "float32"))
    for fmt in ("float32", "bfloat16"):
        if fmt in models:  # bfloat16 rounds where XLA fuses, so two layouts may break near-ties differently
            stacked = ours(fmt, unstack=False)()
            print(f"{fmt}: tokens of the unstacked decode layout equal to the stacked layout's: "
                  f"{np.mean(stacked == outs[f'ours {fmt}']):.1%}")
    for fmt in models:
        for h in hf_names:
            print(f"ratio ours {fmt} / {h}: {best[f'ours {fmt}'] / best[h]:.2f}x (best runs)")


if __name__ == "__main__":
    main()
