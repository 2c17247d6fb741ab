"""Chat templates rendered as transformers renders them, with assistant masks and the end-of-turn token.

`compile_chat_template` compiles a Jinja source as transformers does; `ChatTemplateMixin` gives a backend
`apply_chat_template` (ids and, optionally, the assistant mask described in `lm.tokenizers`), `end_of_turn()`
and `render_chat_template`. `PROJECT_CHAT_TEMPLATE` and `CHATML_TEMPLATE` are the built-in templates;
`chat_template_source` reads what a `data.chat_template` setting names.
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Mapping, Optional, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lm.tokenizers.files import CONFIG, TEMPLATE_FILE

# The project's own format (lm/data/chat.py): bos, then per message its role token and text, eos after each
# assistant reply; a generation prompt ends with `<|assistant|>`.
PROJECT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('role ' ~ message['role'] ~ ' is not one of system, user, assistant') }}{% endif %}"
    "{% if message['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('a system message may only come first') }}{% endif %}"
    "{{ '<|' ~ message['role'] ~ '|>' }}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
# ChatML (Qwen's format), for checkpoints that ship no template (base models): `data.chat_template=chatml`.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_SENTINEL = "\uE000lm-content\uE001"  # private-use characters: never in a template or a real message


def chat_template_source(spec: str) -> str:
    """The Jinja source a `data.chat_template` names: "chatml" (`CHATML_TEMPLATE`) or a template file."""
    if spec == "chatml":
        return CHATML_TEMPLATE
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"chat template {spec!r} is not 'chatml' nor an existing Jinja file")
    with open(spec, encoding="utf-8") as f:
        return f.read()


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask markup) renders its body as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; transformers overrides it the same way.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_chat_template(source: str) -> jinja2.Template:
    """A chat template compiled as transformers compiles it: sandboxed, `trim_blocks`, `lstrip_blocks`, with
    `raise_exception`, `strftime_now` and a non-escaping `tojson`."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _overlaps(s: int, e: int, start: int, end: int) -> bool:
    """Whether the token at characters [s, e) falls in [start, end); a zero-width token (SentencePiece's
    dummy-prefix piece, the leading bytes of a byte-fallback character) by its position."""
    return start <= s < end if s == e else s < end and e > start


class ChatTemplateMixin:
    """`apply_chat_template` for a backend that sets `chat_template` (a Jinja string or None) and provides
    `_template_tokens()` (name -> token string passed to the template), `_special_strings()` and
    `_encode_with_offsets(text) -> (ids, [(start, end)] character spans)`."""

    chat_template: Optional[str] = None

    def render_chat_template(self, messages: Sequence[Mapping], add_generation_prompt: bool = False) -> str:
        """The template applied to `messages`, as text (special tokens appear as their strings). A template's
        own error (`raise_exception`, e.g. "roles must alternate") becomes a ValueError naming the tokenizer."""
        if not self.chat_template:
            raise ValueError(f"tokenizer {getattr(self, 'path', '')} has no chat template (expected `chat_template` "
                             f"in {CONFIG} or a {TEMPLATE_FILE} file; set data.chat_template for a base model)")
        if not hasattr(self, "_compiled_template"):
            self._compiled_template = compile_chat_template(self.chat_template)
        try:  # transformers passes tools and documents (None without them); templates test them
            return self._compiled_template.render(messages=[dict(m) for m in messages], tools=None, documents=None,
                                                  add_generation_prompt=add_generation_prompt,
                                                  **self._template_tokens())
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template of {getattr(self, 'path', '')}: {e}") from e

    def end_of_turn(self) -> Optional[str]:
        """The special token the template puts after an assistant reply (whitespace between allowed), e.g.
        `<|im_end|>`, `<|eot_id|>`, eos; None when it puts none (a model trained so could never stop)."""
        if not hasattr(self, "_end_of_turn"):
            text = self.render_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": _SENTINEL}])
            at = text.find(_SENTINEL)
            if at < 0:
                raise ValueError(f"the chat template of {getattr(self, 'path', '')} does not render an assistant "
                                 "reply's content")
            rest = text[at + len(_SENTINEL):].lstrip()
            ends = [s for s in self._special_strings() if s and rest.startswith(s)]
            self._end_of_turn = max(ends, key=len) if ends else None
        return self._end_of_turn

    def end_of_turn_id(self) -> Optional[int]:
        """The id of `end_of_turn()` (None when there is none)."""
        eot = self.end_of_turn()
        return None if eot is None else self._encode_with_offsets(eot)[0][0]

    def apply_chat_template(self, messages: Sequence[Mapping], add_generation_prompt: bool = False,
                            return_assistant_mask: bool = False):
        """Ids of the rendered conversation, encoded as `transformers` does (`add_special_tokens=False`,
        special-token strings in the text map to their ids).

        Returns `ids` (list[int]), or `(ids, mask)` with `return_assistant_mask`: mask (list[float], one per id)
        is 1.0 on the tokens of each assistant message's content and on the end-of-turn token after it (see the
        module docstring), 0.0 elsewhere.
        """
        text = self.render_chat_template(messages, add_generation_prompt)
        ids, offsets = self._encode_with_offsets(text)
        if not return_assistant_mask:
            return ids
        spans = [self._assistant_span(messages, i, text, add_generation_prompt)
                 for i, m in enumerate(messages) if m.get("role") == "assistant"]
        mask = [1.0 if any(_overlaps(s, e, start, end) for start, end in spans) else 0.0 for s, e in offsets]
        return ids, mask

    def _assistant_span(self, messages, i, text, add_generation_prompt) -> tuple[int, int]:
        marked = [dict(m) for m in messages]
        marked[i]["content"] = _SENTINEL
        start = self.render_chat_template(marked, add_generation_prompt).find(_SENTINEL)
        content = messages[i].get("content")
        if start < 0 or not isinstance(content, str):
            raise ValueError(f"message {i}: the chat template does not render the assistant content as text")
        for rendered in (content, content.strip(), content.lstrip(), content.rstrip()):
            if text.startswith(rendered, start):
                end = start + len(rendered)
                break
        else:
            raise ValueError(f"message {i}: the chat template changes the assistant content; cannot mask it")
        eot = self.end_of_turn()
        gap = len(text[end:]) - len(text[end:].lstrip())  # e.g. Llama-2's ' ' before eos
        if eot and text.startswith(eot, end + gap):
            end += gap + len(eot)
        # What the template writes between the generation prompt and the content (Llama-2's ' ') is part of
        # the reply the model generates, so it is trained too.
        try:
            asked = self.render_chat_template(messages[:i], add_generation_prompt=True) if i else ""
        except ValueError:  # e.g. a template that refuses a conversation ending with a system message
            asked = ""
        if asked and len(asked) <= start and text.startswith(asked):
            start = len(asked)
        return start, end
