"""Tiny random `transformers` models as references: build one, run it, and compare our logits with it."""
import jax
import numpy as np
import torch
import transformers as tr

import lm

V, T = 96, 12


def hf_model(config, seed=0, std=0.15):
    """A tiny `transformers` model of `config` with every parameter random (norm scales around 1, biases
    non-zero; Gemma-style `1 + w` scales then sit around 2, still random)."""
    torch.manual_seed(seed)
    model = tr.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            is_norm_scale = p.ndim == 1 and pname.endswith("weight")
            p.copy_(torch.randn_like(p) * std + (1.0 if is_norm_scale else 0.0))
    return model


def tokens(seed=0, length=T, vocab=V, batch=2):
    return np.random.RandomState(seed).randint(0, vocab, (batch, length))


def hf_logits(model, toks):
    with torch.no_grad():
        return model(torch.tensor(toks)).logits.numpy()


def our_logits(cfg, params, toks, **kw):
    return np.asarray(jax.jit(lm.Transformer(cfg).apply)({"params": params}, toks, **kw))


def random_params(cfg, seed=0):
    """Random NumPy parameters of `Transformer(cfg)` (shapes from `jax.eval_shape`, no model init run)."""
    rng = np.random.RandomState(seed)
    shapes = jax.eval_shape(lambda r: lm.init_params(cfg, r), jax.random.key(0))
    return jax.tree.map(lambda s: rng.normal(0, 0.2, s.shape).astype(np.float32), shapes)


def check_greedy(model, path, prompts, n):
    """Save `model` to `path`, load it with `lm.hf.load`, and assert `lm.generate`'s greedy tokens after each
    prompt equal HF `generate`'s (no eos, so both produce `n` tokens)."""
    from lm import generation, hf

    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    cfg, params = hf.load(path)
    for prompt, got in zip(prompts, generation.generate(cfg, params, prompts, n)):
        assert got == hf_greedy(model, prompt, n), prompt


def hf_greedy(model, prompt, n):
    """`n` greedy tokens of an HF model after `prompt` (a list of ids)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()
