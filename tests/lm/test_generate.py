"""Sampling: pure logit filters vs NumPy/HF, KV-cache parity per family, and `sample`/`generate` behaviour."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import presets
from lm import generation
from lm.generation import _argmax, bucket_length, generate, pad_prompts, phase_ends, sample
from lm.model import Transformer, init_cache
from lm.sampling import apply_temperature, filter_logits, top_k_filter, top_p_filter
from random_weights import random_params

FAMILIES = ["llama-tiny", "bloom-tiny", "glm-tiny", "baichuan-tiny", "gpt2-tiny", "llama3-tiny", "qwen2-tiny",
            "qwen3-tiny", "mistral-tiny", "gemma2-tiny", "gemma3-tiny", "phi3-tiny", "neox-tiny", "opt-tiny",
            "chatglm2-tiny"]
PROMPTS = [[5, 17, 42, 9, 301, 77, 12], [3, 250], [8, 8, 100, 64], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
N_NEW = 6  # one length everywhere, so tests share compiled samplers


@functools.lru_cache(maxsize=None)
def _model(name):
    cfg = presets.get(name)
    if cfg.sliding_window is not None:  # a window shorter than the test sequences, so it hides keys
        cfg = cfg.replace(sliding_window=3)
    return cfg, random_params(cfg, seed=1)


def _np_top_k(x, k):
    kth = np.sort(x, axis=-1)[..., -k][..., None]
    return np.where(x >= kth, x, -np.inf)


def _np_top_p(x, p):
    out = np.full_like(x, -np.inf)
    for r in range(x.shape[0]):
        probs = np.exp(x[r] - x[r].max())
        probs /= probs.sum()
        mass = 0.0
        for i in np.argsort(-x[r], kind="stable"):
            if mass >= p:
                break
            out[r, i] = x[r, i]
            mass += probs[i]
    return out


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ---------------------------------------------------------------- filters


@pytest.mark.parametrize("vocab", [7, 128, 300, 1024])
def test_two_stage_argmax_is_numpys_first_maximum(vocab):
    """Blocks of 16 here: vocabularies inside one block, exactly whole blocks and a padded last block; maxima
    tied within a block, across blocks and in the padded tail, and rows of -inf but one entry."""
    rng = np.random.default_rng(vocab)
    x = rng.integers(-4, 5, size=(12, vocab)).astype(np.float32)  # few values: many ties
    x[1] = -np.inf
    x[1, vocab - 1] = 0.0
    x[2, [0, vocab - 1]] = 9.0
    x[3, -min(vocab, 3):] = 9.0
    got = np.asarray(_argmax(jnp.asarray(x), block=16))
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))


@pytest.mark.parametrize("k", [1, 3, 20])
def test_top_k_matches_numpy(k):
    x = np.random.default_rng(k).normal(size=(4, 50)).astype(np.float32) * 3
    got = np.asarray(top_k_filter(jnp.asarray(x), k))
    np.testing.assert_array_equal(got, _np_top_k(x, k))
    assert (np.isfinite(got).sum(-1) == k).all()


def test_top_k_edge_cases_and_ties():
    x = jnp.asarray([[1.0, 2.0, 2.0, 3.0]])
    np.testing.assert_array_equal(top_k_filter(x, 0), x)
    np.testing.assert_array_equal(top_k_filter(x, 4), x)
    np.testing.assert_array_equal(top_k_filter(x, 2), [[-np.inf, 2.0, 2.0, 3.0]])  # ties with the k-th kept


@pytest.mark.parametrize("p", [1e-6, 0.3, 0.8, 0.95])
def test_top_p_matches_numpy(p):
    x = np.random.default_rng(7).normal(size=(5, 40)).astype(np.float32) * 2
    got = np.asarray(top_p_filter(jnp.asarray(x), p))
    np.testing.assert_array_equal(got, _np_top_p(x, p))
    assert (np.isfinite(got).sum(-1) >= 1).all()
    if p == 1e-6:  # only the most probable token survives
        np.testing.assert_array_equal(np.isfinite(got).sum(-1), 1)


def test_filters_match_transformers_warpers():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    x = np.random.default_rng(3).normal(size=(6, 64)).astype(np.float32) * 2
    xt = torch.from_numpy(x)
    for p in (0.2, 0.7, 0.9):
        want = TopPLogitsWarper(top_p=p)(None, xt).numpy()
        np.testing.assert_array_equal(np.asarray(top_p_filter(jnp.asarray(x), p)), want)
    want = TopKLogitsWarper(top_k=5)(None, xt).numpy()
    np.testing.assert_array_equal(np.asarray(top_k_filter(jnp.asarray(x), 5)), want)


def test_temperature_and_filter_order():
    x = np.random.default_rng(0).normal(size=(3, 30)).astype(np.float32)
    np.testing.assert_allclose(apply_temperature(jnp.asarray(x), 0.5), x / 0.5, rtol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(jnp.asarray(x), 0.0)
    assert np.isfinite(np.asarray(top_p_filter(jnp.asarray(x), 1.0))).all()
    with pytest.raises(ValueError, match="p must be"):
        top_p_filter(jnp.asarray(x), 0.0)
    # Temperature first (it changes the nucleus), then top-k, then top-p.
    got = np.asarray(filter_logits(jnp.asarray(x), temperature=0.3, top_k=10, top_p=0.6))
    want = _np_top_p(_np_top_k(x / np.float32(0.3), 10), 0.6)
    np.testing.assert_allclose(got, want, rtol=1e-6)


# ---------------------------------------------------------------- KV cache


@pytest.mark.parametrize("name", FAMILIES)
def test_cached_decode_matches_full_forward(name):
    """Prefill a right-padded batch, decode token by token at per-row positions; compare with a full pass."""
    cfg, params = _model(name)
    model = Transformer(cfg)
    lengths = np.array([5, 3], np.int32)
    prompt = np.random.default_rng(0).integers(1, cfg.vocab_size, size=(2, 8)).astype(np.int32)
    prompt[1, 3:] = 0  # right padding
    cont = np.random.default_rng(1).integers(1, cfg.vocab_size, size=(2, 4)).astype(np.int32)
    n_new = cont.shape[1]
    prefix_len = jnp.asarray(lengths)  # the prompt is GLM's bidirectional prefix; ignored by causal models

    full = np.zeros((2, 9), np.int32)
    for b in range(2):
        full[b, :lengths[b] + n_new] = np.concatenate([prompt[b, :lengths[b]], cont[b]])
    want = np.asarray(jax.jit(lambda t: model.apply({"params": params}, t, prefix_len=prefix_len))(full))
    atol = 1e-5 * max(1.0, np.abs(want).max())  # f32 rounding grows with the logits (Gemma's exceed 1)

    prefill = jax.jit(lambda t, c: model.apply({"params": params}, t, prefix_len=prefix_len, cache=c))
    step = jax.jit(lambda t, c, i: model.apply({"params": params}, t, prefix_len=prefix_len, cache=c,
                                               decode_index=i))
    logits, cache = prefill(prompt, init_cache(cfg, 2, 16))
    for b in range(2):
        np.testing.assert_allclose(logits[b, :lengths[b]], want[b, :lengths[b]], atol=atol, rtol=0)
    for i in range(n_new):
        logits, cache = step(cont[:, i:i + 1], cache, jnp.asarray(lengths + i))
        for b in range(2):
            np.testing.assert_allclose(logits[b, 0], want[b, lengths[b] + i], atol=atol, rtol=0)


# ---------------------------------------------------------------- sample / generate


def _naive_greedy(cfg, params, prompts, n_new):
    """Greedy decoding that recomputes the full forward (no cache) at every step."""
    width = max(len(p) for p in prompts) + n_new
    tokens, lengths = pad_prompts(prompts, width)
    prefix_len = jnp.asarray(lengths)
    forward = jax.jit(lambda t: Transformer(cfg).apply({"params": params}, t, prefix_len=prefix_len))
    cur = lengths.copy()
    for _ in range(n_new):
        logits = np.asarray(forward(tokens))
        for b in range(len(prompts)):
            tokens[b, cur[b]] = logits[b, cur[b] - 1].argmax()
        cur += 1
    return [tokens[b, lengths[b]:cur[b]].tolist() for b in range(len(prompts))]


@pytest.mark.parametrize("name", ["llama-tiny", "glm-tiny", "gemma2-tiny"])
def test_greedy_generate_matches_naive_loop(name):
    cfg, params = _model(name)
    assert generate(cfg, params, PROMPTS, N_NEW) == _naive_greedy(cfg, params, PROMPTS, N_NEW)


def test_eos_stops_each_row():
    cfg, params = _model("llama-tiny")
    free = generate(cfg, params, PROMPTS, N_NEW)
    eos = free[0][2]
    # Same static arguments as `generate` passes, so both calls share one compiled sampler.
    out = sample(cfg, params, *map(jnp.asarray, pad_prompts(PROMPTS, 16)), jax.random.key(0),
                 max_new_tokens=N_NEW, temperature=0.0, top_k=0, top_p=1.0, eos_id=eos)
    got = generate(cfg, params, PROMPTS, N_NEW, eos_id=eos)
    for b, row in enumerate(free):
        stop = row.index(eos) + 1 if eos in row else len(row)
        assert got[b] == row[:stop]
        np.testing.assert_array_equal(out.mask[b], np.arange(N_NEW) < stop)
        np.testing.assert_array_equal(out.tokens[b, :stop], row[:stop])
        np.testing.assert_array_equal(out.tokens[b, stop:], 0)
        np.testing.assert_array_equal(out.logprobs[b, stop:], 0.0)
        assert int(out.lengths[b]) == stop
    assert len(got[0]) == free[0].index(eos) + 1 <= 3


def test_mixed_prompt_lengths_match_single_rows_without_recompiling():
    cfg, params = _model("llama-tiny")
    batched = generate(cfg, params, PROMPTS, N_NEW)
    assert {bucket_length(len(p)) for p in PROMPTS} == {16}
    before = sample._cache_size()
    singles = [generate(cfg, params, [p], N_NEW)[0] for p in PROMPTS]
    assert singles == batched
    assert sample._cache_size() == before + 1  # three prompt lengths, one bucket, one compile


def test_seeded_sampling_is_reproducible():
    cfg, params = _model("llama-tiny")
    kw = dict(temperature=1.0, top_k=50, top_p=0.95)
    a = generate(cfg, params, PROMPTS, N_NEW, seed=3, **kw)
    assert a == generate(cfg, params, PROMPTS, N_NEW, seed=3, **kw)
    assert a != generate(cfg, params, PROMPTS, N_NEW, seed=4, **kw)


@pytest.mark.parametrize("filtered", [False, True])
def test_logprobs_match_full_forward(filtered):
    """Reported log-probs are those of the sampled tokens under log_softmax(full-forward logits / T)."""
    cfg, params = _model("glm-tiny")
    temp, k, p, n_new = 0.7, 40, 0.9, N_NEW
    tokens, lengths = pad_prompts(PROMPTS, 16)
    out = sample(cfg, params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(5), max_new_tokens=n_new,
                 temperature=temp, top_k=k, top_p=p, filtered_logprobs=filtered)
    assert np.asarray(out.mask).all()
    full, _ = pad_prompts([list(pr) + out.tokens[b].tolist() for b, pr in enumerate(PROMPTS)], 16 + n_new)
    forward = jax.jit(lambda t: Transformer(cfg).apply({"params": params}, t, prefix_len=jnp.asarray(lengths)))
    logits = np.asarray(forward(full))
    for b in range(len(PROMPTS)):
        rows = logits[b, lengths[b] - 1:lengths[b] - 1 + n_new] / np.float32(temp)
        kept = _np_top_p(_np_top_k(rows, k), p)
        assert np.isfinite(kept[np.arange(n_new), out.tokens[b]]).all()  # drawn from the filtered set
        want = _np_log_softmax(kept if filtered else rows)[np.arange(n_new), out.tokens[b]]
        np.testing.assert_allclose(out.logprobs[b], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["gemma2-tiny", "glm-tiny"])
def test_unstacked_decode_layout_samples_what_the_stacked_one_does(name):
    """Per-layer weights and caches (the CPU decode layout) against the scanned stack (GPU/TPU's): the same draws
    and log-probs, through GQA, a sliding window with soft-capping, and GLM's prefix and 2D RoPE."""
    cfg, params = _model(name)
    tokens, lengths = map(jnp.asarray, pad_prompts(PROMPTS, 16))
    kw = dict(max_new_tokens=N_NEW, temperature=0.8, top_k=40)
    stacked = sample(cfg, params, tokens, lengths, jax.random.key(2), unstack=False, **kw)
    unstacked = sample(cfg, params, tokens, lengths, jax.random.key(2), unstack=True, **kw)
    np.testing.assert_array_equal(unstacked.tokens, stacked.tokens)
    np.testing.assert_allclose(unstacked.logprobs, stacked.logprobs, atol=1e-5, rtol=0)


def test_phase_ends_split_the_reply_into_equal_loops_of_at_least_min_phase():
    for n in range(1, 300):
        for phases in (1, 2, 4, 7):
            ends = phase_ends(n, phases)
            spans = np.diff([0] + ends)
            assert ends[-1] == n and (spans > 0).all() and len(ends) <= phases
            assert len(ends) == 1 or (spans >= generation.MIN_PHASE).all() and spans.max() - spans.min() <= 1
    assert phase_ends(128, 4) == [32, 64, 96, 128] and phase_ends(63, 4) == [63]
    with pytest.raises(ValueError, match="phases must be >= 1"):
        phase_ends(8, 0)


def test_decoding_in_phases_samples_what_one_loop_does(monkeypatch):
    """A cache grown between three loops of two tokens (the stacked layout) against one loop over the whole cache
    (the per-layer layout): the same draws and log-probs, through a sliding window shorter than the reply, and an
    eos inside the second loop ends its row there."""
    monkeypatch.setattr(generation, "MIN_PHASE", 2)
    assert phase_ends(N_NEW, 3) == [2, 4, 6]
    cfg, params = _model("mistral-tiny")
    tokens, lengths = map(jnp.asarray, pad_prompts(PROMPTS, 16))
    kw = dict(max_new_tokens=N_NEW, temperature=1.0)
    one = sample(cfg, params, tokens, lengths, jax.random.key(0), phases=1, unstack=True, **kw)
    free = np.asarray(one.tokens).tolist()
    # eos: a token some row first draws third or fourth, so that row stops inside the second loop
    eos = next(row[j] for row in free for j in (2, 3) if row[j] not in row[:j])
    stops = np.asarray([row.index(eos) + 1 if eos in row else N_NEW for row in free])
    three = sample(cfg, params, tokens, lengths, jax.random.key(0), phases=3, unstack=False, eos_id=eos, **kw)
    kept = np.arange(N_NEW)[None, :] < stops[:, None]
    assert {3, 4} & set(stops.tolist()) and np.asarray(three.lengths).tolist() == stops.tolist()
    np.testing.assert_array_equal(three.mask, kept)
    np.testing.assert_array_equal(three.tokens, np.where(kept, free, 0))
    np.testing.assert_allclose(three.logprobs, np.where(kept, one.logprobs, 0.0), atol=1e-5, rtol=0)


def test_top_k_one_equals_greedy():
    cfg, params = _model("llama-tiny")
    greedy = generate(cfg, params, PROMPTS, N_NEW)
    assert generate(cfg, params, PROMPTS, N_NEW, temperature=1.0, top_k=1, seed=9) == greedy


def test_sample_under_a_mesh_matches_single_device():
    cfg, params = _model("llama-tiny")
    mesh = jax.make_mesh((2,), ("data",))
    tokens, lengths = map(jnp.asarray, pad_prompts(PROMPTS, 16))
    fn = functools.partial(sample, cfg, max_new_tokens=N_NEW, temperature=0.0, top_k=0, top_p=1.0, eos_id=None)
    want = fn(params, tokens, lengths, jax.random.key(0))
    row = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    with jax.set_mesh(mesh):
        got = jax.jit(fn, in_shardings=(rep, row, row, rep), out_shardings=row)(params, tokens, lengths,
                                                                                 jax.random.key(0))
    assert got.tokens.sharding.spec == jax.sharding.PartitionSpec("data")
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)


def test_bad_inputs_are_named():
    cfg, params = _model("llama-tiny")
    with pytest.raises(ValueError, match="non-empty"):
        generate(cfg, params, [[1], []], 2)
    with pytest.raises(ValueError, match="prompt 1 has token ids"):
        generate(cfg, params, [[1], [cfg.vocab_size]], 2)
    with pytest.raises(ValueError, match="max_len"):
        generate(cfg, params, [[1] * 10], cfg.max_len)
    with pytest.raises(ValueError, match="prompt_lengths"):
        sample(cfg, params, jnp.zeros((2, 4), jnp.int32), jnp.ones((3,), jnp.int32), jax.random.key(0),
               max_new_tokens=2)
