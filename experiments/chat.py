"""Chat with a trained model in the terminal, with the chat template SFT trained on; replies stream as generated.

  python -m experiments.chat --checkpoint=runs/pipeline/ppo [--tokenizer=PATH] [--temperature=0.7]
      [--top_k=0] [--top_p=0.9] [--max_new_tokens=256] [--system="You are a helpful assistant."] [--stats]

`--checkpoint` is a run directory (or its `checkpoints/`) of any stage, whose metadata holds the model config,
or a Hugging Face directory (`config.json` + safetensors, read with lm.hf). The tokenizer defaults to the
run's `tokenizer.model`. Type a message per line; `/reset` forgets the conversation, `/exit` or end of input
(Ctrl-D) quits.

Streaming: the conversation is prefilled into a KV cache, then tokens are decoded `--chunk` at a time by one
jitted `lax.scan` (compiled once per setting), and the text decoded so far is printed after each chunk.
"""
from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from typing import Iterator, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

import experiments
from lm import checkpoint, hf, sharding
from lm.config import ModelConfig
from lm.data import format_prompt
from lm.generate import bucket_length
from lm.model import Transformer, init_cache
from lm.sampling import filter_logits
from lm.tokenizer import Tokenizer
from rl import ppo_loop, reward

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Run directory, its checkpoints/, or a Hugging Face directory.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "SentencePiece model; default: the run's tokenizer.model.")
_SYSTEM = flags.DEFINE_string("system", None, "Optional system message that starts every conversation.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.7, "Sampling temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens; 0 keeps all.")
_TOP_P = flags.DEFINE_float("top_p", 0.9, "Nucleus sampling mass; 1.0 keeps all.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Longest reply, in tokens.")
_CHUNK = flags.DEFINE_integer("chunk", 8, "Tokens decoded per device call between screen updates.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_MESH = flags.DEFINE_list("mesh_shape", ["1", "-1", "1"], "Devices per (data, fsdp, tensor) axis for the params.")
_STATS = flags.DEFINE_bool("stats", False, "After each reply, print its token count and speed to stderr.")

# One conversation at a time: nothing to split over the batch axis, so batch is replicated.
CHAT_RULES = tuple((name, None if name == "batch" else axes) for name, axes in sharding.RULES)


def is_hf_dir(path: str) -> bool:
    """True when `path` holds a Hugging Face checkpoint: a config.json naming its architecture or model type
    (a run directory's config.json is the run config)."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and ("architectures" in config or "model_type" in config)


def default_tokenizer(path: str) -> Optional[str]:
    """The tokenizer a run recorded beside its checkpoints (`RUN/tokenizer.model`), if there is one."""
    path = os.path.abspath(path)
    run = path if os.path.isdir(os.path.join(path, "checkpoints")) or is_hf_dir(path) else os.path.dirname(path)
    candidate = os.path.join(run, "tokenizer.model")
    return candidate if os.path.isfile(candidate) else None


def load_model(path: str, mesh, rules=CHAT_RULES) -> tuple[ModelConfig, dict]:
    """`(cfg, params)` of a language model laid out on `mesh`, from a run directory or a Hugging Face directory.

    A run directory of any policy stage works (its newest checkpoint: pretrain, SFT, DPO, or a PPO run's
    actor); a reward model's run is refused, having no language-model head.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--checkpoint={path}: no such directory")
    if is_hf_dir(path):
        cfg, host_params = hf.load(path)
        abstract = reward.abstract_params(cfg, "lm", mesh, rules)
        return cfg, jax.device_put(host_params, jax.tree.map(lambda a: a.sharding, abstract))
    ckpt = experiments.checkpoint_dir(path)
    meta = checkpoint.load_meta(ckpt)
    if "model" not in meta:
        raise ValueError(f"checkpoint {ckpt} has no model config in its metadata (key 'model')")
    if meta.get("head", "lm") != "lm":
        raise ValueError(f"checkpoint {ckpt} holds a reward model ({meta['head']} head); chat needs a policy: "
                         "a pretrain, SFT, PPO or DPO run")
    cfg = ModelConfig.from_dict(meta["model"])
    if meta.get("stage") == "ppo":
        return cfg, ppo_loop.load_policy(ckpt, cfg, mesh, rules)
    return cfg, checkpoint.load_params(ckpt, reward.abstract_params(cfg, "lm", mesh, rules))


def _pick(logits, key, temperature: float, top_k: int, top_p: float):
    """Next token `[B]` from logits `[B, V]`: argmax at temperature 0, else a draw from the filtered logits."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len"))
def _prefill(cfg: ModelConfig, params, tokens, prefix_len, *, cache_len: int):
    """KV cache `[L, 1, cache_len, ...]` holding right-padded prompt `tokens [1, W]` (W <= cache_len)."""
    _, cache = Transformer(cfg).apply({"params": params}, tokens, prefix_len=prefix_len,
                                      cache=init_cache(cfg, tokens.shape[0], cache_len))
    return cache


@functools.partial(jax.jit, static_argnames=("cfg", "steps", "temperature", "top_k", "top_p", "eos_id"),
                   donate_argnames=("cache",))
def _decode(cfg: ModelConfig, params, cache, token, index, prefix_len, rng, *, steps: int, temperature: float,
            top_k: int, top_p: float, eos_id: int):
    """`steps` tokens after `token [B]` (which sits at `index [B]`); after eos a row repeats eos.

    Returns `(tokens [B, steps], cache, last token [B], next index [B])`.
    """
    model = Transformer(cfg)

    def step(carry, i):
        token, cache, index = carry
        logits, cache = model.apply({"params": params}, token[:, None], prefix_len=prefix_len, cache=cache,
                                    decode_index=index)
        new = _pick(logits[:, 0], jax.random.fold_in(rng, i), temperature, top_k, top_p)
        new = jnp.where(token == eos_id, eos_id, new)
        return (new, cache, index + 1), new

    (token, cache, index), tokens = jax.lax.scan(step, (token, cache, index), jnp.arange(steps))
    return tokens.T, cache, token, index


def stream(cfg: ModelConfig, params, prompt: Sequence[int], *, max_new_tokens: int, eos_id: int, rng,
           temperature: float = 0.7, top_k: int = 0, top_p: float = 1.0, chunk: int = 8) -> Iterator[list[int]]:
    """Yield the reply to `prompt` (token ids) in pieces of up to `chunk` token ids; eos ends it (not yielded).

    The prompt is right-padded to a power-of-two width (few prefill compilations) in a cache of
    `cfg.max_len`; decoding restarts from the last prompt token, as `lm.generate.sample` does, so greedy
    replies equal `lm.generate.generate`'s.
    """
    n = len(prompt)
    room = chunk * math.ceil(max_new_tokens / chunk)
    if n == 0 or n + room > cfg.max_len:
        raise ValueError(f"stream: prompt of {n} tokens + {room} decoded tokens must fit cfg.max_len={cfg.max_len}")
    width = min(bucket_length(n), cfg.max_len)
    tokens = np.zeros((1, width), np.int32)
    tokens[0, :n] = prompt
    prefix_len = jnp.asarray([n], jnp.int32) if cfg.mask == "prefix" else None
    cache = _prefill(cfg, params, jnp.asarray(tokens), prefix_len, cache_len=cfg.max_len)
    token, index = jnp.asarray([prompt[-1]], jnp.int32), jnp.asarray([n - 1], jnp.int32)
    left = max_new_tokens
    for c in range(room // chunk):
        out, cache, token, index = _decode(cfg, params, cache, token, index, prefix_len, jax.random.fold_in(rng, c),
                                           steps=chunk, temperature=float(temperature), top_k=int(top_k),
                                           top_p=float(top_p), eos_id=int(eos_id))
        piece = [int(t) for t in jax.device_get(out)[0, :left]]
        if eos_id in piece:
            piece = piece[:piece.index(eos_id)]
            if piece:
                yield piece
            return
        left -= len(piece)
        yield piece


class ChatSession:
    """A conversation: the history in the SFT chat template and streamed replies to new user messages."""

    def __init__(self, cfg: ModelConfig, params, tokenizer: Tokenizer, *, system: Optional[str] = None,
                 temperature: float = 0.7, top_k: int = 0, top_p: float = 1.0, max_new_tokens: int = 256,
                 chunk: int = 8, seed: int = 0):
        experiments.check_vocab(tokenizer, cfg)
        if max_new_tokens < 1 or chunk < 1:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) and chunk ({chunk}) must be >= 1")
        self.cfg, self.params, self.tokenizer, self.system = cfg, params, tokenizer, system
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, chunk=chunk)
        self.max_new_tokens = max_new_tokens
        self.room = cfg.max_len - chunk * math.ceil(max_new_tokens / chunk)
        if self.room < 2:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in cfg.max_len="
                             f"{cfg.max_len}")
        self.rng = jax.random.key(seed)
        self.history: list[dict] = []
        self.turns = 0
        self.last_tokens = 0

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.history = []

    def prompt_ids(self, message: str) -> np.ndarray:
        """Template ids asking for the reply to `message`; the oldest turns are dropped until it fits."""
        history = list(self.history)
        while True:
            ids = format_prompt(self.tokenizer, message, system=self.system, history=history)
            if len(ids) <= self.room:
                return ids
            if not history:
                raise ValueError(f"the message is {len(ids)} tokens with the template; at most {self.room} fit "
                                 f"beside max_new_tokens={self.max_new_tokens} in max_len={self.cfg.max_len}")
            history = history[2:]  # one user/assistant exchange

    def reply(self, message: str) -> Iterator[str]:
        """Stream the assistant's reply to `message` as text pieces; the exchange joins the history at the end."""
        prompt = self.prompt_ids(message)
        rng = jax.random.fold_in(self.rng, self.turns)
        self.turns += 1
        ids, shown = [], ""
        for piece in stream(self.cfg, self.params, prompt.tolist(), max_new_tokens=self.max_new_tokens,
                            eos_id=self.tokenizer.eos_id, rng=rng, **self.sampling):
            ids += piece
            text = self.tokenizer.decode(ids)
            if text.endswith("\ufffd"):  # a character whose UTF-8 bytes are not all decoded yet
                continue
            if text.startswith(shown) and len(text) > len(shown):
                yield text[len(shown):]
                shown = text
        text = self.tokenizer.decode(ids)
        if text != shown:
            yield text[len(shown):] if text.startswith(shown) else "\n" + text
        self.last_tokens = len(ids)
        self.history += [{"role": "user", "content": message}, {"role": "assistant", "content": text}]


def repl(session: ChatSession, stdin=None, stdout=None, stats: bool = False) -> None:
    """Read one message per line until `/exit` or end of input; `/reset` starts a new conversation.

    stdin / stdout default to the process's; `stats` prints each reply's token count and time to stderr.
    """
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            stdout.write("\n")
            return
        message = line.strip()
        if not message:
            continue
        if message == "/exit":
            return
        if message == "/reset":
            session.reset()
            stdout.write("(conversation cleared)\n")
            continue
        stdout.write("assistant> ")
        stdout.flush()
        start = time.perf_counter()
        try:
            for piece in session.reply(message):
                stdout.write(piece)
                stdout.flush()
        except ValueError as e:
            stdout.write(f"\n(error: {e})")
        stdout.write("\n")
        if stats:
            seconds = time.perf_counter() - start
            print(f"[{session.last_tokens} tokens in {seconds:.2f}s]", file=sys.stderr, flush=True)


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)  # keep checkpoint-loading chatter out of the conversation
    path = _CHECKPOINT.value
    if not path:
        raise app.UsageError("--checkpoint is required (a run directory or a Hugging Face directory)")
    tokenizer_path = _TOKENIZER.value or default_tokenizer(path)
    if tokenizer_path is None:
        raise app.UsageError(f"no tokenizer.model beside {path}; pass --tokenizer=PATH")
    try:
        tokenizer = Tokenizer.load(tokenizer_path)
        mesh = sharding.make_mesh([int(s) for s in _MESH.value])
        cfg, params = load_model(path, mesh)
        session = ChatSession(cfg, params, tokenizer, system=_SYSTEM.value, temperature=_TEMPERATURE.value,
                              top_k=_TOP_K.value, top_p=_TOP_P.value, max_new_tokens=_MAX_NEW.value,
                              chunk=_CHUNK.value, seed=_SEED.value)
    except (FileNotFoundError, ValueError) as e:  # a wrong path or flag: one line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    # The model's activation constraints follow the rules while the jitted steps are traced.
    with jax.set_mesh(mesh), nn.logical_axis_rules(CHAT_RULES):
        repl(session, stats=_STATS.value)


if __name__ == "__main__":
    app.run(main)
