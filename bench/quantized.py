"""Quantised inference of a trained model (`lm.quantize`): float32 against int8, int4 and NF4 weights and w8a8
(int8 weights and activations), the last also with the output head quantised.

  python bench/quantized.py --run=RUN_OR_HF_DIR [--text=data/text/en.txt] [--batch=8] [--new=64]

For each format, in one run: the bytes of the weights (layer projections quantised in blocks of 64 with float32
scales; embeddings, norms and the output head as they are), perplexity of `--docs` paragraphs of `--text`
(first `--width` tokens each, teacher-forced), greedy agreement with the float32 model (share of generated tokens
equal position by position, and of rows equal throughout) on the first tokens of those paragraphs, and decode
tokens/s (`lm.generate`, batch `--batch`, `--new` tokens, best of `--repeats`, compilation excluded).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lm  # noqa: E402
from lm.losses import token_log_probs  # noqa: E402

FORMATS = ("float32", "int8", "int4", "nf4", "w8a8", "w8a8+head")  # "+head": the output head quantised too


def _paragraphs(path: str, tok, n: int, width: int) -> np.ndarray:
    """`[n, width]` token ids: the first `width` tokens of the first `n` paragraphs that are that long."""
    rows = []
    for para in open(path, encoding="utf-8").read().split("\n\n"):
        ids = tok.encode(para.strip())
        if len(ids) >= width:
            rows.append(ids[:width])
        if len(rows) == n:
            return np.asarray(rows, np.int32)
    raise ValueError(f"{path}: fewer than {n} paragraphs of {width} tokens")


def _perplexity(cfg, params, tokens) -> float:
    logits = lm.Transformer(cfg).apply({"params": params}, jnp.asarray(tokens[:, :-1]))
    return math.exp(-float(jnp.mean(token_log_probs(logits, jnp.asarray(tokens[:, 1:])))))


def _weight_bytes(params) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(params))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a run directory or Hugging Face directory (lm.load)")
    ap.add_argument("--text", default="data/text/en.txt", help="held-out text, paragraphs split by blank lines")
    ap.add_argument("--docs", type=int, default=32)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--block", type=int, default=64)
    a = ap.parse_args()

    cfg, params, tok = lm.load(a.run)
    cfg = cfg.replace(max_len=max(cfg.max_len, a.prompt + a.new))
    text = _paragraphs(a.text, tok, a.docs, a.width)
    prompts = [list(r[:a.prompt]) for r in text[:a.batch]]
    ref = None
    print(f"{a.run}: {lm.count_params(cfg) / 1e6:.2f}M parameters; {a.docs} paragraphs of {a.width} tokens of "
          f"{a.text}; decode batch {a.batch}, {a.prompt} + {a.new} tokens")
    print("| weights | bytes (MiB) | perplexity | greedy tokens equal | rows equal | decode tokens/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for fmt in FORMATS:
        name, _, head = fmt.partition("+")
        qcfg, qparams = (cfg, params) if fmt == "float32" else lm.quantize(cfg, params, name, a.block,
                                                                           head=head == "head")
        ppl = _perplexity(qcfg, qparams, text)
        out = lm.generate(qcfg, qparams, prompts, a.new)  # also the warm-up (compilation)
        times = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            lm.generate(qcfg, qparams, prompts, a.new)
            times.append(time.perf_counter() - t)
        ref = out if ref is None else ref
        same = np.mean([x == y for r, o in zip(ref, out) for x, y in zip(r, o)])
        rows = np.mean([r == o for r, o in zip(ref, out)])
        print(f"| {fmt} | {_weight_bytes(qparams) / 2**20:.2f} | {ppl:.3f} | {same:.3f} | {rows:.3f} | "
              f"{a.batch * a.new / min(times):,.0f} |", flush=True)


if __name__ == "__main__":
    main()
