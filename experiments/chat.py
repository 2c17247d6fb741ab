"""Chat with a trained model in the terminal, in its chat template (the one SFT trained on, or a Hugging Face
checkpoint's own); replies stream as generated.

  python -m experiments.chat --checkpoint=runs/pipeline/ppo [--tokenizer=PATH] [--temperature=0.7]
      [--top_k=0] [--top_p=0.9] [--max_new_tokens=256] [--system="You are a helpful assistant."] [--stats]

`--checkpoint` is a run directory (or its `checkpoints/`) of any stage, whose metadata holds the model config,
or a Hugging Face directory (`config.json` + safetensors, read with lm.hf). The tokenizer (with its chat
template) defaults to the run's or checkpoint's own. Type a message per line; `/reset` forgets the
conversation, `/exit` or end of input (Ctrl-D) quits.

Streaming: the conversation is prefilled into a KV cache, then tokens are decoded `--chunk` at a time by one
jitted `lax.scan` (compiled once per setting), and the text decoded so far is printed after each chunk.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Iterator, Optional

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags, logging

import lm
from lm import runs, sharding
from lm.config import ModelConfig
from lm.data.chat import format_prompt, stop_id
from lm.generation import stream

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Run directory, its checkpoints/, or a Hugging Face directory.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "Tokenizer (.model file or directory); default: the run's own.")
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


class ChatSession:
    """A conversation: the history in the SFT chat template and streamed replies to new user messages."""

    def __init__(self, cfg: ModelConfig, params, tokenizer, *, system: Optional[str] = None,
                 temperature: float = 0.7, top_k: int = 0, top_p: float = 1.0, max_new_tokens: int = 256,
                 chunk: int = 8, seed: int = 0):
        runs.check_vocab(tokenizer, cfg)
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
                            eos_id=stop_id(self.tokenizer), rng=rng, **self.sampling):
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
    try:
        mesh = sharding.make_mesh([int(s) for s in _MESH.value])
        cfg, params, tokenizer = lm.load(path, mesh=mesh, rules=CHAT_RULES, head="lm",
                                         tokenizer=_TOKENIZER.value or None)
        if tokenizer is None:
            raise app.UsageError(f"no tokenizer in {path}; pass --tokenizer=PATH")
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
