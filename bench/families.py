"""Every Hugging Face architecture the importer reads, measured on tiny random `transformers` models: the max
|logit error| of `lm.hf.load` against transformers (f32, eager attention), of the `lm.hf.save` export reloaded
by transformers, of the Pallas kernels (interpret mode on CPU) against the XLA path, and whether greedy
`lm.generate` gives HF `generate`'s tokens. Sequences are longer than every sliding window and every scaled
RoPE's original context. The configs are the parity tests' (tests/lm/test_hf*.py).

    .venv/bin/python bench/families.py            # prints a markdown table (~2 min on 2 cores)
    .venv/bin/python bench/families.py --stages   # and every stage's step on every tiny family preset, one
                                                  # device against an 8-device mesh (~7 min more)
"""
from __future__ import annotations

import argparse
import os
import pathlib
import time
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "lm")]  # the repo first: tests/lm is no package

import jax  # noqa: E402
import numpy as np  # noqa: E402
import transformers as tr  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
tr.utils.logging.disable_progress_bar()

import hf_refs  # noqa: E402
import test_hf  # noqa: E402
import test_hf_llama_family as llama_family  # noqa: E402
import test_families  # noqa: E402
import test_hf_more_families as more_families  # noqa: E402
from lm import generation, hf  # noqa: E402

PROMPTS = [[5, 17, 42, 9, 30, 77, 12, 3, 60, 21, 8], [3, 25], [8, 8, 10, 64, 1, 2]]
N_NEW = 20  # the longest row reaches 31 tokens, past every window (8) and original context (16-24)


def cases():
    """(name, architecture, config, sequence length, export architecture or None for hf.save's default)."""
    for name, (arch, config, length) in llama_family.CASES.items():
        yield name, arch, config, length, arch
    for name, config in more_families.HF_CONFIGS.items():
        yield name, more_families.ARCH[name.split("_")[0]], config, more_families.LENGTH, None
    for name, config in test_hf.HF_CONFIGS.items():
        yield name, test_hf.ARCH[name], config, 24, None
    # ChatGLM2/3: no transformers class; GLM-4's computes its function, and the export is our ChatGLM2 layout.
    yield "chatglm2 (via GLM-4)", "ChatGLMModel", more_families._glm, 24, "ChatGLMModel"


def measure(arch, config, length, export_arch, tmp):
    model = hf_refs.hf_model(config())
    toks = hf_refs.tokens(length=length)
    ref = hf_refs.hf_logits(model, toks)
    model.save_pretrained(tmp / "hf")
    cfg, params = hf.load(tmp / "hf")
    load_err = np.abs(hf_refs.our_logits(cfg, params, toks) - ref).max()
    hf.save(cfg, params, tmp / "out", architecture=export_arch)
    if export_arch == "ChatGLMModel":  # read back by our loader (transformers needs remote code for it)
        back_cfg, back_params = hf.load(tmp / "out")
        export_err = np.abs(hf_refs.our_logits(back_cfg, back_params, toks) - ref).max()
    else:
        back = tr.AutoModelForCausalLM.from_pretrained(tmp / "out", attn_implementation="eager").eval()
        export_err = np.abs(hf_refs.hf_logits(back, toks) - ref).max()
    pallas_err = np.abs(hf_refs.our_logits(cfg.replace(attention_impl="pallas"), params, toks)
                        - hf_refs.our_logits(cfg, params, toks)).max()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    ours = generation.generate(cfg, params, PROMPTS, N_NEW)
    same = sum(got == hf_refs.hf_greedy(model, prompt, N_NEW) for prompt, got in zip(PROMPTS, ours))
    return load_err, export_err, pallas_err, same


def stages():
    """`tests/test_families.check_family` on every tiny family preset (it raises on a mismatch)."""
    print("\n| preset | pretrain/SFT, reward, DPO steps and a PPO iteration, 1 device vs (2, 2, 2) | seconds |")
    print("| --- | --- | --- |")
    for name in test_families.FAMILIES:
        start = time.perf_counter()
        test_families.check_family(name)
        print(f"| {name} | finite, equal | {time.perf_counter() - start:.0f} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", action="store_true", help="also run every stage on every tiny family preset")
    args = ap.parse_args()
    print("| case | architecture | load vs transformers | export reloaded | Pallas vs XLA | greedy rows equal |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, arch, config, length, export_arch in cases():
        with tempfile.TemporaryDirectory() as tmp:
            load_err, export_err, pallas_err, same = measure(arch, config, length, export_arch, pathlib.Path(tmp))
        print(f"| {name} | {arch} | {load_err:.1e} | {export_err:.1e} | {pallas_err:.1e} | {same}/{len(PROMPTS)} |",
              flush=True)
    if args.stages:
        stages()


if __name__ == "__main__":
    main()
