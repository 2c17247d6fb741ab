"""The one chat template shared by SFT, reward modelling, PPO, DPO and the chat REPL.

A conversation is `[bos] (<|system|> text)? (<|user|> text <|assistant|> reply [eos])* ...`: role markers
and bos/eos are inserted by id (user text cannot forge them) and each reply ends with eos, so generation
stops at eos. A prompt for generation ends right after `<|assistant|>`.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from lm.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


def _role_id(tokenizer: Tokenizer, role: str) -> int:
    return {"system": tokenizer.system_id, "user": tokenizer.user_id, "assistant": tokenizer.assistant_id}[role]


def format_chat(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of a conversation and its loss mask.

    Args:
      tokenizer: the project tokenizer.
      messages: `[{"role": "system"|"user"|"assistant", "content": str}, ...]`; a system message may only
        come first.

    Returns:
      `(ids, loss_mask)`, int32 and float32 `[N]`: loss_mask is 1 on every assistant reply token and the eos
      closing it (what the model must learn to produce), 0 on bos, role markers, system and user text.
    """
    ids, mask = [tokenizer.bos_id], [0.0]
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i}: role {role!r} is not one of {ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
        if role == "system" and i != 0:
            raise ValueError(f"message {i}: a system message may only come first")
        ids.append(_role_id(tokenizer, role))
        mask.append(0.0)
        body = tokenizer.encode(content)
        if role == "assistant":
            ids += body + [tokenizer.eos_id]
            mask += [1.0] * (len(body) + 1)
        else:
            ids += body
            mask += [0.0] * len(body)
    return np.asarray(ids, np.int32), np.asarray(mask, np.float32)


def format_prompt(tokenizer: Tokenizer, prompt: str, *, system: Optional[str] = None,
                  history: Sequence[Mapping[str, str]] = ()) -> np.ndarray:
    """Token ids that ask the model for the assistant's reply to `prompt`: they end with `<|assistant|>`.

    `history` holds earlier `{"role", "content"}` turns (user/assistant); `system` an optional system text.
    `format_prompt(p)` followed by `format_response(r)` equals `format_chat` of the two turns.
    """
    messages = ([{"role": "system", "content": system}] if system is not None else []) + list(history)
    ids, _ = format_chat(tokenizer, messages + [{"role": "user", "content": prompt}])
    return np.concatenate([ids, np.asarray([tokenizer.assistant_id], np.int32)])


def format_response(tokenizer: Tokenizer, response: str) -> np.ndarray:
    """Token ids of an assistant reply as it follows `format_prompt`: the text then eos."""
    return np.asarray(tokenizer.encode(response) + [tokenizer.eos_id], np.int32)
