"""KV-cache sampling: a jitted prefill + decode loop (`sample`) for PPO rollouts, `generate` for lists, and
`stream` for one conversation, yielding tokens in chunks as they are decoded (the chat REPL).

`sample` is a pure function of arrays (config and sampling settings are static), so a caller can wrap it
in `jax.jit` with its own shardings. Prompts are right-padded `[B, P]` with per-row lengths; the decode
loop is a `lax.while_loop` (no Python loop and no host sync per token) that stops when every row has
emitted `eos_id` or `max_new_tokens` tokens. Long replies decode in a few such loops (`phase_ends`) with the
cache grown between them, so that attention does not read the empty end of the cache from the first token.

On CPU the decode loop reads per-layer copies of the block weights and per-layer cache arrays
(`unstack=None` picks this by backend): XLA:CPU copies a layer's slice out of a stacked array before each
matmul, at every step, while GPU and TPU read such slices in place (and the stack costs no second copy of the
weights there).

Log-prob convention (PPO): `logprobs[b, t]` is the log-probability of the sampled token under the
temperature-scaled distribution *before* top-k/top-p, `log_softmax(logits / temperature)` (TRL's choice,
so they match log-probs recomputed by a plain forward pass at that temperature). `filtered_logprobs=True`
returns them under the truncated distribution actually drawn from instead. Greedy decoding
(`temperature=0`) reports `log_softmax(logits)`.
"""
from __future__ import annotations

import functools
import math
from typing import Iterator, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lm.config import ModelConfig
from lm.model import Transformer, init_cache, unstack_cache, unstack_layers
from lm.sampling import apply_temperature, top_k_filter, top_p_filter

MIN_BUCKET = 16
ARGMAX_BLOCK = 128
DECODE_PHASES = 4  # loops `sample` decodes in by default (pure-JAX attention)
MIN_PHASE = 32  # fewest tokens a loop decodes


class SampleOutput(NamedTuple):
    """Result of `sample`; N = max_new_tokens.

    tokens: int32 [B, N] sampled tokens; after a row's eos (which is kept) the rest are `pad_id`.
    logprobs: float32 [B, N] log-prob of each sampled token (see the module docstring); 0 where mask is 0.
    mask: float32 [B, N] 1 for generated tokens (eos included), 0 after.
    lengths: int32 [B] number of generated tokens per row (`mask.sum(-1)`).
    """
    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array
    lengths: jax.Array


def bucket_length(n: int) -> int:
    """Padded prompt width for a longest prompt of `n` tokens: the next power of two, at least 16."""
    return max(MIN_BUCKET, 1 << max(0, int(n) - 1).bit_length())


def phase_ends(n: int, phases: int) -> list[int]:
    """Where each of `sample`'s decode loops stops, for `n` new tokens in up to `phases` loops of at least
    `MIN_PHASE` tokens, as equal as integers allow: e.g. 128 tokens in 4 loops end at 32, 64, 96, 128; 48 tokens
    take one loop."""
    if phases < 1:
        raise ValueError(f"sample: phases must be >= 1, got {phases}")
    loops = max(1, min(phases, n // MIN_PHASE))
    return [n * i // loops for i in range(1, loops + 1)]


def pad_prompts(prompts: Sequence[Sequence[int]], width: int, pad_id: int = 0):
    """Right-pad token lists into `(tokens int32 [B, width], lengths int32 [B])` NumPy arrays."""
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    lengths = np.zeros((len(prompts),), np.int32)
    for b, p in enumerate(prompts):
        if len(p) > width:
            raise ValueError(f"pad_prompts: prompt {b} has {len(p)} tokens, more than width={width}")
        tokens[b, :len(p)] = p
        lengths[b] = len(p)
    return tokens, lengths


def _first_max(x):
    """First index of the maximum along the last axis, as two plain reductions (a variadic argmax reduction is
    several times slower on CPU)."""
    top = jnp.max(x, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == top, iota, x.shape[-1]), axis=-1)


def _argmax(x, block: int = ARGMAX_BLOCK):
    """`jnp.argmax(x, -1)` of `x: [B, V]` (the first index of the maximum), in two stages: the maximum of each
    block of `block` entries, then the first maximum within the first block that holds the overall maximum.
    This runs once per generated token over the whole vocabulary; on CPU it takes less than half the time of one
    reduction over rows of V (short reductions vectorise where one long one does not)."""
    b, v = x.shape
    if v <= block:
        return _first_max(x)
    padded = -(-v // block) * block
    blocks = jnp.pad(x, ((0, 0), (0, padded - v)), constant_values=-jnp.inf).reshape(b, padded // block, block)
    first = _first_max(jnp.max(blocks, axis=-1))
    within = jnp.take_along_axis(blocks, first[:, None, None], axis=1)[:, 0]
    return first * block + _first_max(within)


def _log_prob(logits, token):
    """`log_softmax(logits)[token]` without materialising the whole log-softmax."""
    picked = jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def _choose(logits, key, temperature, top_k, top_p, filtered_logprobs):
    """Next token `[B]` and its log-prob from `logits: [B, V]` (float32)."""
    if temperature == 0.0:
        token = _argmax(logits)
        return token, _log_prob(logits, token)
    scaled = apply_temperature(logits, temperature)
    filtered = top_p_filter(top_k_filter(scaled, top_k), top_p)
    token = _argmax(filtered + jax.random.gumbel(key, filtered.shape))  # Gumbel-max: a draw from softmax(filtered)
    return token, _log_prob(filtered if filtered_logprobs else scaled, token)


def unstacked_by_default() -> bool:
    """Whether decoding unstacks the layers when not told (see the module docstring): on CPU."""
    return jax.default_backend() == "cpu"


def _decode_layout(params, cache, unstack: Optional[bool]):
    """`(params, cache)` as the decode loop reads them: per layer (`lm.model.unstack_layers`) or as given."""
    if unstack is None:
        unstack = unstacked_by_default()
    return (unstack_layers(params), unstack_cache(cache)) if unstack else (params, cache)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k", "top_p", "eos_id",
                                             "pad_id", "filtered_logprobs", "unstack", "logprobs", "phases"))
def sample(cfg: ModelConfig, params, prompt_tokens, prompt_lengths, rng, *, max_new_tokens: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_id: Optional[int] = None,
           pad_id: int = 0, filtered_logprobs: bool = False, unstack: Optional[bool] = None,
           logprobs: bool = True, phases: Optional[int] = None) -> SampleOutput:
    """Sample `max_new_tokens` continuations of right-padded prompts with a KV cache.

    Args:
      cfg: the model config (static). params: `Transformer(cfg)` parameters.
      prompt_tokens: int32 `[B, P]`, right-padded. prompt_lengths: int32 `[B]`, each in `[1, P]`.
      rng: a PRNG key (unused when temperature is 0).
      max_new_tokens: N, tokens generated per row. temperature: 0 is greedy. top_k: 0 disables.
      top_p: 1.0 disables. eos_id: a row stops after emitting it (None: never). pad_id: fills finished rows.
      filtered_logprobs: report log-probs under the top-k/top-p-truncated distribution (default: before it).
      unstack: decode with per-layer weights and cache arrays (None: on CPU only; the tokens are the same).
      logprobs: False leaves `SampleOutput.logprobs` zero and skips computing them (a log-sum-exp over the
        vocabulary per token), for callers that only want the tokens (`generate`).
      phases: decode in up to this many loops of at least `MIN_PHASE` tokens each, the cache growing between
        them (`phase_ends`), so attention reads the slots filled so far rounded up to the loop's end rather than
        the whole `P + N` from the first token; each loop is one more compiled body. None: `DECODE_PHASES` with
        the pure-JAX attention (`cfg.attention_impl == "xla"`), which reads every slot it is given; 1 with the
        Pallas decode kernel, which reads only up to each row's length. The tokens do not depend on it.

    The prompt is prefilled into a cache of length `P + N` (reached in phases); for `cfg.mask == "prefix"` (GLM)
    it is the bidirectional prefix (`prefix_len = prompt_lengths`) and positions follow `default_positions`. The
    decode loop then feeds one token per row at that row's own position, starting by re-feeding the last prompt
    token (at `prompt_lengths - 1`) so every new token comes from the same single-token step.
    """
    b, p = prompt_tokens.shape
    if prompt_lengths.shape != (b,):
        raise ValueError(f"sample: prompt_lengths has shape {prompt_lengths.shape}, expected ({b},) to match "
                         f"prompt_tokens {prompt_tokens.shape}")
    if p + max_new_tokens + cfg.virtual_tokens > cfg.max_len:
        raise ValueError(f"sample: prompt width {p} + max_new_tokens {max_new_tokens} (+ {cfg.virtual_tokens} prompt/"
                         f"prefix tuning tokens) exceeds cfg.max_len={cfg.max_len}")
    if not 0 <= pad_id < cfg.vocab_size:
        raise ValueError(f"sample: pad_id={pad_id} is not a token id (vocab_size={cfg.vocab_size})")
    if temperature < 0:
        raise ValueError(f"sample: temperature must be >= 0, got {temperature}")
    n = max_new_tokens
    model = Transformer(cfg)
    variables = {"params": params}
    lengths = prompt_lengths.astype(jnp.int32)
    prefix_len = lengths if cfg.mask == "prefix" else None

    ends = phase_ends(n, phases if phases is not None else DECODE_PHASES if cfg.attention_impl == "xla" else 1)

    # Prefill; its logits are unused (and so never computed under jit): the loop re-feeds the last token.
    _, cache = model.apply(variables, prompt_tokens.astype(jnp.int32), prefix_len=prefix_len,
                           cache=init_cache(cfg, b, p + ends[0]))
    decode_params, cache = _decode_layout(params, cache, unstack)

    def body(state):
        t, token, cache, done, out_tokens, out_logprobs, out_mask = state
        logits, cache = model.apply({"params": decode_params}, token[:, None], prefix_len=prefix_len, cache=cache,
                                    decode_index=lengths - 1 + t)
        new, logp = _choose(logits[:, 0], jax.random.fold_in(rng, t), temperature, top_k, top_p,
                            filtered_logprobs)
        logp = logp if logprobs else jnp.zeros_like(logp)  # then XLA drops its computation
        new = jnp.where(done, pad_id, new)
        out_tokens = out_tokens.at[:, t].set(new)
        out_logprobs = out_logprobs.at[:, t].set(jnp.where(done, 0.0, logp))
        out_mask = out_mask.at[:, t].set(jnp.where(done, 0.0, 1.0))
        if eos_id is not None:
            done = done | (new == eos_id)
        return t + 1, new, cache, done, out_tokens, out_logprobs, out_mask

    last = jnp.take_along_axis(prompt_tokens.astype(jnp.int32), (lengths - 1)[:, None], axis=1)[:, 0]
    state = (jnp.int32(0), last, cache, jnp.zeros((b,), bool), jnp.full((b, n), pad_id, jnp.int32),
             jnp.zeros((b, n), jnp.float32), jnp.zeros((b, n), jnp.float32))
    for i, end in enumerate(ends):
        if i:  # step t writes slot lengths - 1 + t < P + t: slots up to P + end serve the steps before `end`
            more = end - ends[i - 1]
            cache = jax.tree.map(lambda c: jnp.pad(c, [(0, 0)] * (c.ndim - 2) + [(0, more), (0, 0)]), state[2])
            state = state[:2] + (cache,) + state[3:]
        state = jax.lax.while_loop(lambda s, end=end: (s[0] < end) & ~jnp.all(s[3]), body, state)
    _, _, _, _, tokens, logprobs, mask = state
    return SampleOutput(tokens, logprobs, mask, jnp.sum(mask, axis=-1).astype(jnp.int32))


def generate(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, eos_id: Optional[int] = None,
             seed: int = 0) -> list[list[int]]:
    """New tokens for each prompt (a list of token ids, lengths may differ), cut after `eos_id` (kept).

    temperature=0 is greedy. Prompts are right-padded to a power-of-two width (`bucket_length`) so prompts
    of similar lengths reuse one compiled `sample`.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: prompts must be a non-empty list of non-empty token lists")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    for b, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"generate: prompt {b} has token ids {bad[:5]} outside [0, {cfg.vocab_size})")
    longest = max(len(p) for p in prompts)
    room = cfg.max_len - max_new_tokens - cfg.virtual_tokens
    if longest > room:
        raise ValueError(f"generate: longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) "
                         f"exceeds cfg.max_len={cfg.max_len}")
    tokens, lengths = pad_prompts(prompts, min(bucket_length(longest), room))
    out = sample(cfg, params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(seed),
                 max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
                 top_p=float(top_p), eos_id=eos_id, logprobs=False)
    new_tokens, new_lengths = jax.device_get((out.tokens, out.lengths))
    return [row[:n].tolist() for row, n in zip(new_tokens, new_lengths)]


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len"))
def _prefill(cfg: ModelConfig, params, tokens, prefix_len, *, cache_len: int):
    """KV cache `[L, B, Hkv, cache_len, D]` holding right-padded prompts `tokens [B, W]` (W <= cache_len), in the
    decode layout (`_decode_layout`)."""
    _, cache = Transformer(cfg).apply({"params": params}, tokens, prefix_len=prefix_len,
                                      cache=init_cache(cfg, tokens.shape[0], cache_len))
    return unstack_cache(cache) if unstacked_by_default() else cache


@functools.partial(jax.jit, static_argnames=("cfg", "steps", "temperature", "top_k", "top_p", "eos_id"),
                   donate_argnames=("cache",))
def _decode_chunk(cfg: ModelConfig, params, cache, token, index, t0, prefix_len, rng, *, steps: int,
                  temperature: float, top_k: int, top_p: float, eos_id: int):
    """`steps` tokens after `token [B]` (which sits at `index [B]`), the t-th drawn with `fold_in(rng, t0 + t)`
    as `sample` draws it; after eos a row repeats eos. Returns `(tokens [B, steps], cache, last token, index)`."""
    model = Transformer(cfg)

    def step(carry, i):
        token, cache, index = carry
        logits, cache = model.apply({"params": params}, token[:, None], prefix_len=prefix_len, cache=cache,
                                    decode_index=index)
        new, _ = _choose(logits[:, 0], jax.random.fold_in(rng, t0 + i), temperature, top_k, top_p, False)
        new = jnp.where(token == eos_id, eos_id, new)
        return (new, cache, index + 1), new

    (token, cache, index), tokens = jax.lax.scan(step, (token, cache, index), jnp.arange(steps))
    return tokens.T, cache, token, index


def stream(cfg: ModelConfig, params, prompt: Sequence[int], *, max_new_tokens: int, eos_id: int, rng,
           temperature: float = 0.7, top_k: int = 0, top_p: float = 1.0, chunk: int = 8) -> Iterator[list[int]]:
    """Yield the reply to `prompt` (token ids) in pieces of up to `chunk` token ids; eos ends it (not yielded).

    The same tokens as `sample` with the same `rng` (greedy or sampled): the prompt is right-padded to a
    power-of-two width (few prefill compilations) in a cache of the power of two that holds the prompt and the
    reply (at most `cfg.max_len`; attention reads every slot of it at every token), and decoding restarts from
    the last prompt token; each device call decodes `chunk` tokens with one `lax.scan`.
    """
    n = len(prompt)
    room = chunk * math.ceil(max_new_tokens / chunk)
    limit = cfg.max_len - cfg.virtual_tokens  # prompt/prefix tuning tokens sit in front
    if n == 0 or n + room > limit:
        raise ValueError(f"stream: prompt of {n} tokens + {room} decoded tokens must fit cfg.max_len={cfg.max_len}"
                         f" (less {cfg.virtual_tokens} prompt/prefix tuning tokens)")
    width = min(bucket_length(n), limit)
    tokens, _ = pad_prompts([prompt], width)
    prefix_len = jnp.asarray([n], jnp.int32) if cfg.mask == "prefix" else None
    cache = _prefill(cfg, params, jnp.asarray(tokens), prefix_len, cache_len=min(limit, bucket_length(n + room)))
    params = unstack_layers(params) if unstacked_by_default() else params  # as `_prefill` left the cache
    token, index = jnp.asarray([prompt[-1]], jnp.int32), jnp.asarray([n - 1], jnp.int32)
    left = max_new_tokens
    for c in range(room // chunk):
        out, cache, token, index = _decode_chunk(cfg, params, cache, token, index, jnp.int32(c * chunk), prefix_len,
                                                 rng, steps=chunk, temperature=float(temperature), top_k=int(top_k),
                                                 top_p=float(top_p), eos_id=int(eos_id))
        piece = [int(t) for t in jax.device_get(out)[0, :left]]
        if eos_id in piece:
            piece = piece[:piece.index(eos_id)]
            if piece:
                yield piece
            return
        left -= len(piece)
        yield piece
