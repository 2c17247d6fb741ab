"""Chat formatting for SFT, reward modelling, PPO, DPO and the chat REPL, for any tokenizer.

With the project tokenizer (`lm.tokenizer.Tokenizer`) a conversation is
`[bos] (<|system|> text)? (<|user|> text <|assistant|> reply [eos])* ...`: role markers and bos/eos are
inserted by id (user text cannot forge them) and each reply ends with eos, so generation stops at eos. A
prompt for generation ends right after `<|assistant|>`.

With a checkpoint's tokenizer (`lm.tokenizers.HFTokenizer` / `SentencePieceTokenizer`) the checkpoint's own
chat template is rendered, as transformers does (`apply_chat_template`): the loss mask covers each assistant
reply and the end-of-turn token after it, and generation stops at that token (`stop_id`: e.g. `<|im_end|>`,
`<|eot_id|>`, or eos). A reply's ids are those that follow the prompt's in the tokenized conversation, so a
template must render `prompt + reply` as the prompt's text followed by the reply's (every common template does).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from lm.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


def _role_id(tokenizer: Tokenizer, role: str) -> int:
    return {"system": tokenizer.system_id, "user": tokenizer.user_id, "assistant": tokenizer.assistant_id}[role]


def check_messages(messages: Sequence[Mapping[str, str]]) -> None:
    """Roles are system/user/assistant, contents strings, and a system message comes only first."""
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i}: role {role!r} is not one of {ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
        if role == "system" and i != 0:
            raise ValueError(f"message {i}: a system message may only come first")


def _project(tokenizer) -> bool:
    return isinstance(tokenizer, Tokenizer)


def format_chat(tokenizer, messages: Sequence[Mapping[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of a conversation and its loss mask.

    Args:
      tokenizer: the project tokenizer or any `lm.tokenizers` backend with a chat template.
      messages: `[{"role": "system"|"user"|"assistant", "content": str}, ...]`; a system message may only
        come first.

    Returns:
      `(ids, loss_mask)`, int32 and float32 `[N]`: loss_mask is 1 on every assistant reply token and the
      token closing it (eos, or the template's end of turn), 0 on everything else.
    """
    check_messages(messages)
    if not _project(tokenizer):
        ids, mask = tokenizer.apply_chat_template(messages, return_assistant_mask=True)
        return np.asarray(ids, np.int32), np.asarray(mask, np.float32)
    ids, mask = [tokenizer.bos_id], [0.0]
    for m in messages:
        ids.append(_role_id(tokenizer, m["role"]))
        mask.append(0.0)
        body = tokenizer.encode(m["content"])
        if m["role"] == "assistant":
            ids += body + [tokenizer.eos_id]
            mask += [1.0] * (len(body) + 1)
        else:
            ids += body
            mask += [0.0] * len(body)
    return np.asarray(ids, np.int32), np.asarray(mask, np.float32)


def prompt_ids(tokenizer, messages: Sequence[Mapping[str, str]]) -> np.ndarray:
    """Token ids that ask for the assistant's reply to `messages` (which end with a user message)."""
    check_messages(messages)
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("a prompt must end with a user message")
    if not _project(tokenizer):
        return np.asarray(tokenizer.apply_chat_template(messages, add_generation_prompt=True), np.int32)
    ids, _ = format_chat(tokenizer, messages)
    return np.concatenate([ids, np.asarray([tokenizer.assistant_id], np.int32)])


def _as_messages(prompt) -> list:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def format_prompt(tokenizer, prompt: str, *, system: Optional[str] = None,
                  history: Sequence[Mapping[str, str]] = ()) -> np.ndarray:
    """`prompt_ids` of the user message `prompt` after `history` (earlier user/assistant turns) and an
    optional `system` text. `format_prompt(p)` then `format_response(r, p)` is `format_chat` of the two turns."""
    messages = ([{"role": "system", "content": system}] if system is not None else []) + list(history)
    return prompt_ids(tokenizer, messages + [{"role": "user", "content": prompt}])


def format_response(tokenizer, response: str, prompt=None) -> np.ndarray:
    """Token ids of an assistant reply as it follows the prompt: the text then eos (project tokenizer), or the
    reply and its end-of-turn token as the chat template renders and tokenizes them after the prompt `prompt`
    (a user text or a message list, needed then).

    With a template the whole conversation is tokenized at once and the reply is what follows
    `prompt_ids(prompt)`, so its ids are those of the same text in context (SentencePiece's dummy prefix,
    merges across the boundary); when the conversation's ids do not start with the prompt's, the reply's
    rendered text is tokenized on its own instead (as TRL's DPO does).
    """
    if _project(tokenizer):
        return np.asarray(tokenizer.encode(response) + [tokenizer.eos_id], np.int32)
    if prompt is None:
        raise ValueError("format_response with a chat template needs the prompt the reply answers")
    messages = _as_messages(prompt)
    head = prompt_ids(tokenizer, messages)
    conversation = messages + [{"role": "assistant", "content": response}]
    ids, mask = tokenizer.apply_chat_template(conversation, return_assistant_mask=True)
    end = max((i + 1 for i, m in enumerate(mask) if m), default=0)
    if end > len(head) and ids[:len(head)] == head.tolist():
        return np.asarray(ids[len(head):end], np.int32)
    before = tokenizer.render_chat_template(messages, add_generation_prompt=True)
    whole = tokenizer.render_chat_template(conversation)
    if not whole.startswith(before):
        raise ValueError(f"the chat template of {tokenizer.path} does not render a reply after the generation "
                         "prompt (prompt + reply is not the prompt's text followed by the reply's); cannot split "
                         "prompt and reply")
    reply = whole[len(before):]
    eot = tokenizer.end_of_turn()
    cut = reply.rfind(eot) + len(eot) if eot and eot in reply else len(reply.rstrip())
    return np.asarray(tokenizer.encode(reply[:cut]), np.int32)


def stop_id(tokenizer) -> int:
    """The id that ends an assistant reply, where generation stops: eos (project tokenizer), else the
    template's end-of-turn token (`end_of_turn_id`: `<|eot_id|>`, `<|im_end|>`, eos, ...). A template that puts
    no special token after a reply is an error: a model trained on it would never learn to stop."""
    if _project(tokenizer):
        return tokenizer.eos_id
    i = tokenizer.end_of_turn_id()
    if i is None:
        raise ValueError(f"the chat template of {tokenizer.path} puts no special token of the tokenizer after an "
                         "assistant reply, so generation could never stop (e.g. 'chatml' on a vocabulary without "
                         "<|im_end|>); use a template whose end-of-turn marker is one (data.chat_template)")
    return i
