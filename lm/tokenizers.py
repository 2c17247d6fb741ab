"""Any tokenizer a checkpoint ships with, behind one small interface, and chat templates rendered as HF does.

`load(path)` picks the backend from what `path` holds:
  - a directory with `tokenizer.json` -> `HFTokenizer` (the `tokenizers` library, special tokens from
    `tokenizer_config.json` / `special_tokens_map.json`, chat template from `chat_template.jinja` or the config);
  - a SentencePiece model trained by this project (a run directory's `tokenizer.model`, or such a `.model`
    file, with no `tokenizer_config.json` beside it) -> `ProjectTokenizer`, i.e. `lm.tokenizer.Tokenizer` plus
    the project chat template;
  - any other SentencePiece model (a `.model` file, or a directory with `tokenizer.model` and optionally
    `tokenizer_config.json`) -> `SentencePieceTokenizer`.

Every backend has `encode(text)` (no bos/eos added; in the new backends special-token strings in the text
map to their ids, as `tokenizers` does with `add_special_tokens=False`), `decode(ids)`, `vocab_size` and
`bos_id` / `eos_id` / `pad_id` / `unk_id`. Ids are None where the checkpoint genuinely has no such token
(GPT-NeoX has no bos); a checkpoint without a pad token uses pad = eos (`pad_is_eos` is then True), the
convention of most RLHF code, since padding is masked out anyway.

Assistant mask rule (`apply_chat_template(..., return_assistant_mask=True)`): a token gets 1.0 when its
character span overlaps an assistant reply: its rendered content, what the template writes between the
generation prompt and that content (Llama-2's `' '`), and the special token the template puts after it (the
end of turn, `end_of_turn()`: `<|im_end|>`, `<|eot_id|>`, eos, whitespace between included, as Llama-2's
`' ' + eos`); everything else gets 0.0. The masked tokens are thus what a model generates after the prompt.
Each content's position is found by rendering the conversation once more with that content replaced by a
sentinel, so headers or other messages that happen to contain the same text cannot be mistaken for it.
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Mapping, Optional, Protocol, Sequence

import jinja2
import jinja2.ext
import sentencepiece as spm
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lm import tokenizer as project

CONFIG, SPECIAL_MAP, TEMPLATE_FILE = "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"
TOKENIZER_JSON, SP_MODEL = "tokenizer.json", "tokenizer.model"
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")

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


class TokenizerLike(Protocol):
    """What every backend returned by `load` offers."""

    vocab_size: int
    bos_id: Optional[int]
    eos_id: Optional[int]
    pad_id: Optional[int]
    unk_id: Optional[int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


# ---------------------------------------------------------------------------------------------- templates

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


# ------------------------------------------------------------------------------------- Hugging Face backend

def _token_string(value) -> Optional[str]:
    """A special token as written in tokenizer_config.json / special_tokens_map.json: a string or a dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: expected a JSON object ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"cannot read {path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_hf_config(directory: str) -> tuple[dict, dict[str, Optional[str]], Optional[str]]:
    """(tokenizer_config, special token name -> string, chat template) of an HF tokenizer directory."""
    config = _read_json(os.path.join(directory, CONFIG)) if os.path.isfile(os.path.join(directory, CONFIG)) else {}
    specials = {name: _token_string(config.get(name)) for name in SPECIAL_NAMES}
    map_path = os.path.join(directory, SPECIAL_MAP)
    if os.path.isfile(map_path):
        for name, value in _read_json(map_path).items():
            if name in specials and specials[name] is None:
                specials[name] = _token_string(value)
    template = config.get("chat_template")
    template_path = os.path.join(directory, TEMPLATE_FILE)
    if os.path.isfile(template_path):
        with open(template_path, encoding="utf-8") as f:
            template = f.read()
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return config, specials, template if isinstance(template, str) else None


class _SpecialIds:
    """bos/eos/pad/unk ids and strings shared by the new backends (pad falls back to eos)."""

    def _set_specials(self, strings: dict[str, Optional[str]], ids: dict[str, Optional[int]]):
        self.special_tokens = {k: v for k, v in strings.items() if v is not None}
        self.bos_id, self.eos_id, self.unk_id = ids["bos_token"], ids["eos_token"], ids["unk_token"]
        self.pad_is_eos = ids["pad_token"] is None
        self.pad_id = self.eos_id if self.pad_is_eos else ids["pad_token"]

    def _template_tokens(self) -> dict[str, str]:
        return dict(self.special_tokens)


class HFTokenizer(_SpecialIds, ChatTemplateMixin):
    """A Hugging Face `tokenizer.json` read with the `tokenizers` library (no transformers)."""

    def __init__(self, directory: str):
        import tokenizers

        self.path = os.path.join(directory, TOKENIZER_JSON)
        try:
            self._tok = tokenizers.Tokenizer.from_file(self.path)
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise ValueError(f"cannot read {self.path}: expected a Hugging Face tokenizer.json ({e})") from e
        config, strings, self.chat_template = _read_hf_config(directory)
        self._clean_up = bool(config.get("clean_up_tokenization_spaces", False))
        self._set_specials(strings, {k: None if v is None else self._tok.token_to_id(v) for k, v in strings.items()})

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no bos/eos added, special-token strings in `text` become their ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def token_id(self, token: str) -> Optional[int]:
        """The id of the vocabulary entry `token`, None when it has none."""
        return self._tok.token_to_id(token)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; special tokens appear as their strings unless `skip_special_tokens`."""
        text = self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self._clean_up:  # transformers' clean_up_tokenization
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (transformers' `len(tokenizer)`)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _special_strings(self) -> list[str]:
        return [t.content for t in self._tok.get_added_tokens_decoder().values() if t.special]

    def _encode_with_offsets(self, text):
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, list(enc.offsets)

    def __repr__(self):
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


# -------------------------------------------------------------------------------------- SentencePiece backend

def _sp_pieces(sp: spm.SentencePieceProcessor, text: str):
    """SentencePiece's pieces of `text`, each with `id` and UTF-8 byte offsets `begin` / `end`."""
    proto = sp.EncodeAsProto(text)
    if isinstance(proto, bytes):  # sentencepiece releases that return the serialized proto
        from sentencepiece import sentencepiece_pb2

        proto = sentencepiece_pb2.SentencePieceText.FromString(proto)
    return proto.pieces


def _sp_encode_with_offsets(sp: spm.SentencePieceProcessor, text: str, specials: Mapping[str, int]):
    """Ids and character spans of `text`: special-token strings map to their ids, the text between them is
    encoded piece by piece (each piece gets SentencePiece's dummy prefix, like transformers' legacy Llama)."""
    ids, offsets, pos = [], [], 0
    order = sorted((s for s in specials if s), key=len, reverse=True)
    while pos < len(text):
        nxt = min(((text.find(s, pos), -len(s), s) for s in order if text.find(s, pos) >= 0), default=None)
        stop = nxt[0] if nxt else len(text)
        if stop > pos:
            segment = text[pos:stop]
            char_of_byte = [i for i, c in enumerate(segment) for _ in c.encode("utf-8")] + [len(segment)]
            for piece in _sp_pieces(sp, segment):
                ids.append(piece.id)
                offsets.append((pos + char_of_byte[piece.begin], pos + char_of_byte[piece.end]))
        if nxt:
            ids.append(specials[nxt[2]])
            offsets.append((stop, stop + len(nxt[2])))
            pos = stop + len(nxt[2])
        else:
            pos = len(text)
    return ids, offsets


class SentencePieceTokenizer(_SpecialIds, ChatTemplateMixin):
    """Any SentencePiece model (e.g. Llama-2's), with the special tokens of a tokenizer_config.json beside it
    or else the model's own bos/eos/pad/unk ids."""

    def __init__(self, model_path: str, config_dir: Optional[str] = None):
        self.path = model_path
        self._sp = spm.SentencePieceProcessor()
        try:
            with open(model_path, "rb") as f:
                self._sp.LoadFromSerializedProto(f.read())
        except Exception as e:  # sentencepiece raises bare RuntimeError/OSError for bad bytes
            raise ValueError(f"cannot read {model_path}: expected a SentencePiece model ({e})") from e
        own = {"bos_token": self._sp.bos_id(), "eos_token": self._sp.eos_id(), "unk_token": self._sp.unk_id(),
               "pad_token": self._sp.pad_id()}
        own = {k: (None if i < 0 else i) for k, i in own.items()}
        strings = {k: None if i is None else self._sp.IdToPiece(i) for k, i in own.items()}
        self.chat_template = None
        if config_dir is not None and any(os.path.isfile(os.path.join(config_dir, n))
                                          for n in (CONFIG, SPECIAL_MAP, TEMPLATE_FILE)):
            _, strings, self.chat_template = _read_hf_config(config_dir)
        ids = {k: None if s is None else self.token_id(s) for k, s in strings.items()}
        self._set_specials(strings, ids)
        # Control and unknown pieces are matched in text (user-defined ones SentencePiece matches itself).
        self._specials = {self._sp.IdToPiece(i): i for i in range(self._sp.GetPieceSize())
                          if self._sp.IsControl(i) or self._sp.IsUnknown(i)}
        self._specials.update({s: ids[k] for k, s in strings.items() if s is not None and ids[k] is not None})

    def token_id(self, piece: str) -> Optional[int]:
        """The id of the vocabulary piece `piece`, None when it has none."""
        i = self._sp.PieceToId(piece)
        return i if self._sp.IdToPiece(i) == piece else None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no bos/eos added, special-token strings in `text` become their ids."""
        return self._encode_with_offsets(text)[0]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; control pieces (bos, eos, ...) appear as their strings unless `skip_special_tokens`."""
        out, run = [], []
        for i in map(int, ids):
            if self._sp.IsControl(i):
                out.append(self._sp.DecodeIds(run))
                run = []
                if not skip_special_tokens:
                    out.append(self._sp.IdToPiece(i))
            else:
                run.append(i)
        return "".join(out) + self._sp.DecodeIds(run)

    @property
    def vocab_size(self) -> int:
        """Number of pieces."""
        return self._sp.GetPieceSize()

    def _special_strings(self) -> list[str]:
        return list(self._specials)

    def _encode_with_offsets(self, text):
        return _sp_encode_with_offsets(self._sp, text, self._specials)

    def __repr__(self):
        return f"SentencePieceTokenizer({self.path!r}, vocab_size={self.vocab_size})"


class ProjectTokenizer(project.Tokenizer, ChatTemplateMixin):
    """The project tokenizer (`lm.tokenizer.Tokenizer`, unchanged) with `PROJECT_CHAT_TEMPLATE`, which gives
    the ids and loss mask of `lm.data.chat.format_chat`. Unlike `format_chat`, role-token strings inside a
    message become role ids here, as with any HF template: the data pipelines keep using `format_chat`."""

    chat_template = PROJECT_CHAT_TEMPLATE

    def _template_tokens(self):
        return {"bos_token": project.BOS, "eos_token": project.EOS, "unk_token": project.UNK,
                "pad_token": project.PAD}

    def _special_strings(self):
        return list(self.special_ids)

    def _encode_with_offsets(self, text):
        return _sp_encode_with_offsets(self._sp, text, self.special_ids)


# ------------------------------------------------------------------------------------------------------ load

def _is_project_model(path: str) -> bool:
    sp = spm.SentencePieceProcessor()
    try:
        with open(path, "rb") as f:
            sp.LoadFromSerializedProto(f.read())
    except Exception:
        return False  # let the SentencePiece backend raise the error naming the file
    return not project.missing_special_tokens(sp)


def load(path: str) -> TokenizerLike:
    """The tokenizer at `path`: a `.model` file, an HF tokenizer directory or a run directory (see the module
    docstring for which backend each gets). Raises FileNotFoundError / ValueError naming what is missing."""
    if os.path.isfile(path):
        if not path.endswith(".model"):
            raise ValueError(f"{path} is not a tokenizer: expected a SentencePiece `.model` file or a directory "
                             f"with {TOKENIZER_JSON} or {SP_MODEL}")
        return ProjectTokenizer.load(path) if _is_project_model(path) else SentencePieceTokenizer(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer path {path} does not exist")
    if os.path.isfile(os.path.join(path, TOKENIZER_JSON)):
        return HFTokenizer(path)
    model = os.path.join(path, SP_MODEL)  # also lm.runs.TOKENIZER, a run directory's tokenizer
    if os.path.isfile(model):
        if not os.path.isfile(os.path.join(path, CONFIG)) and _is_project_model(model):
            return ProjectTokenizer.load(model)
        return SentencePieceTokenizer(model, path)
    raise FileNotFoundError(f"no tokenizer in {path}: expected {TOKENIZER_JSON} (Hugging Face) or {SP_MODEL} "
                            "(SentencePiece, e.g. a run directory's tokenizer)")


# ------------------------------------------------------------------------------------------------------ save
# A SentencePiece model as a `tokenizers` pipeline: SentencePiece's normaliser (dummy prefix, spaces as "▁"), its
# BPE or unigram model with byte fallback over the whole text (no pre-tokenizer), control pieces as special added
# tokens; each stretch of text between special tokens gets the dummy prefix, as `_sp_encode_with_offsets` does.

_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER = 1, 2, 3, 4  # sentencepiece_model.proto's ModelProto.SentencePiece.Type
_SP_UNIGRAM, _SP_BPE = 1, 2  # TrainerSpec.ModelType


def _sp_to_tokenizers(model_proto: bytes, add_bos: bool = True, add_eos: bool = False):
    """A `tokenizers.Tokenizer` encoding as the SentencePiece model `model_proto` does (BPE or unigram); the
    post-processor adds bos / eos for `add_special_tokens=True` when asked."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors

    proto = sentencepiece_model_pb2.ModelProto.FromString(model_proto)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if spec.treat_whitespace_as_suffix:
        raise ValueError("cannot export a SentencePiece model with treat_whitespace_as_suffix as tokenizer.json")
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    unk = next((i for i, p in enumerate(pieces) if p[2] == _SP_UNKNOWN), None)
    if spec.model_type == _SP_BPE:
        vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
        normal = {p for p, _, t in pieces if t == _SP_NORMAL}
        merges = []  # SentencePiece merges the pair whose piece scores highest: rank merges by that score
        for i in sorted((i for i, p in enumerate(pieces) if p[2] == _SP_NORMAL), key=lambda i: (-pieces[i][1], i)):
            piece = pieces[i][0]
            merges += sorted(((piece[:k], piece[k:]) for k in range(1, len(piece))
                              if piece[:k] in normal and piece[k:] in normal), key=lambda m: (vocab[m[0]], vocab[m[1]]))
        model = models.BPE(vocab=vocab, merges=merges, unk_token=None if unk is None else pieces[unk][0],
                           byte_fallback=spec.byte_fallback, fuse_unk=True)
    elif spec.model_type == _SP_UNIGRAM:
        model = models.Unigram([(p, s) for p, s, _ in pieces], unk_id=unk, byte_fallback=spec.byte_fallback)
    else:
        raise ValueError(f"cannot export a SentencePiece model of type {spec.model_type} as tokenizer.json "
                         "(BPE and unigram are supported)")
    tok = Tokenizer(model)
    steps = [normalizers.Precompiled(norm.precompiled_charsmap)] if norm.precompiled_charsmap else []
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else []))
    tok.add_tokens([AddedToken(p, special=t != _SP_USER, normalized=False) for p, _, t in pieces
                    if t in (_SP_UNKNOWN, _SP_CONTROL, _SP_USER)])
    bos = pieces[spec.bos_id][0] if add_bos and 0 <= spec.bos_id < len(pieces) else None
    eos = pieces[spec.eos_id][0] if add_eos and 0 <= spec.eos_id < len(pieces) else None
    if bos or eos:
        def template(seq):
            return " ".join(x for x in (bos and f"{bos}:{seq}", f"${'AB'[seq]}:{seq}", eos and f"{eos}:{seq}") if x)
        tok.post_processor = processors.TemplateProcessing(
            single=template(0), pair=f"{template(0)} {template(1)}",
            special_tokens=[(t, tok.token_to_id(t)) for t in (bos, eos) if t])
    return tok


def _write_config(directory: str, config: dict, template: Optional[str]) -> None:
    """tokenizer_config.json, and the chat template as chat_template.jinja (where transformers 5 writes it) and
    in the config's `chat_template` (where transformers 4 reads it)."""
    config = {k: v for k, v in config.items() if k != "chat_template"}
    if template:
        config["chat_template"] = template
    with open(os.path.join(directory, CONFIG), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    if template:
        with open(os.path.join(directory, TEMPLATE_FILE), "w", encoding="utf-8") as f:
            f.write(template)


def save(tokenizer, directory: str) -> str:
    """Write `tokenizer` (any backend of `load`, or an `lm.tokenizer.Tokenizer`) as a directory that
    `transformers.AutoTokenizer.from_pretrained` loads, with our `encode` ids for `encode(text,
    add_special_tokens=False)`, our bos/eos/unk/pad tokens and our chat template (`chat_template.jinja`).

      - `HFTokenizer`: its tokenizer.json, special_tokens_map.json and tokenizer_config.json (the class it
        names, else PreTrainedTokenizerFast).
      - `SentencePieceTokenizer` and the project tokenizer: the SentencePiece model (BPE or unigram) rebuilt as a
        tokenizer.json (`PreTrainedTokenizerFast`; tokenizer.model is copied beside). It encodes as SentencePiece
        does, with the dummy prefix on each stretch of text between special tokens, where transformers' own
        conversion of a Llama tokenizer.model would drop it after a special token or before a leading space.
        The project tokenizer gets bos/eos/unk/pad = <s>, </s>, <unk>, <pad>, its control tokens as special
        tokens and `PROJECT_CHAT_TEMPLATE`. Unlike `lm.tokenizer.Tokenizer.encode`, which reads control-token
        strings in text as plain text, transformers (like `ProjectTokenizer.apply_chat_template`) maps them to
        their ids.
    `add_special_tokens=True` (transformers' default) prepends bos as a Llama tokenizer does. Returns `directory`.
    """
    import shutil

    os.makedirs(directory, exist_ok=True)
    if isinstance(tokenizer, HFTokenizer):
        source = os.path.dirname(tokenizer.path)
        shutil.copyfile(tokenizer.path, os.path.join(directory, TOKENIZER_JSON))
        if os.path.isfile(os.path.join(source, SPECIAL_MAP)):
            shutil.copyfile(os.path.join(source, SPECIAL_MAP), os.path.join(directory, SPECIAL_MAP))
        config = dict(_read_hf_config(source)[0])
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        for name, value in tokenizer.special_tokens.items():
            config.setdefault(name, value)
        _write_config(directory, config, tokenizer.chat_template)
        return directory
    if isinstance(tokenizer, SentencePieceTokenizer):
        with open(tokenizer.path, "rb") as f:
            model = f.read()
        source = os.path.dirname(tokenizer.path)
        has_config = os.path.basename(tokenizer.path) == SP_MODEL and os.path.isfile(os.path.join(source, CONFIG))
        config = _read_hf_config(source)[0] if has_config else {}
        # transformers' Llama-specific keys would rebuild the pipeline its own way; tokenizer.json is ours.
        config = {k: v for k, v in config.items() if k not in ("legacy", "add_prefix_space", "sp_model_kwargs",
                                                               "tokenizer_file", "auto_map")}
        specials, template = tokenizer.special_tokens, tokenizer.chat_template
        add_bos, add_eos = config.get("add_bos_token", True), config.get("add_eos_token", False)
    elif isinstance(tokenizer, project.Tokenizer):
        model, config = tokenizer._proto, {"additional_special_tokens": list(project.SPECIAL_TOKENS)}
        specials = {"bos_token": project.BOS, "eos_token": project.EOS, "unk_token": project.UNK,
                    "pad_token": project.PAD}
        template, add_bos, add_eos = PROJECT_CHAT_TEMPLATE, True, False
    else:
        raise TypeError(f"lm.tokenizers.save: cannot save a {type(tokenizer).__name__}")
    _sp_to_tokenizers(model, add_bos, add_eos).save(os.path.join(directory, TOKENIZER_JSON))
    with open(os.path.join(directory, SP_MODEL), "wb") as f:
        f.write(model)
    config.update(specials, tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=False)
    _write_config(directory, config, template)
    return directory
