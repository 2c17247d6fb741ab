"""The tokenizer backends `lm.tokenizers.load` returns: `HFTokenizer` (a tokenizer.json), `SentencePieceTokenizer`
(any SentencePiece model) and `ProjectTokenizer` (this project's own model with `PROJECT_CHAT_TEMPLATE`)."""
from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import sentencepiece as spm

from lm import tokenizer as project
from lm.tokenizers.files import CONFIG, SPECIAL_MAP, TEMPLATE_FILE, TOKENIZER_JSON, _read_hf_config
from lm.tokenizers.templates import PROJECT_CHAT_TEMPLATE, ChatTemplateMixin


class _SpecialIds:
    """bos/eos/pad/unk ids and strings shared by the new backends (pad falls back to eos)."""

    def _set_specials(self, strings: dict[str, Optional[str]], ids: dict[str, Optional[int]]):
        self.special_tokens = {k: v for k, v in strings.items() if v is not None}
        self.bos_id, self.eos_id, self.unk_id = ids["bos_token"], ids["eos_token"], ids["unk_token"]
        self.pad_is_eos = ids["pad_token"] is None
        self.pad_id = self.eos_id if self.pad_is_eos else ids["pad_token"]

    def _template_tokens(self) -> dict[str, str]:
        return dict(self.special_tokens)


# ------------------------------------------------------------------------------------- Hugging Face backend

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

    special_tokens = {"bos_token": project.BOS, "eos_token": project.EOS, "unk_token": project.UNK,
                      "pad_token": project.PAD}  # the names transformers gives them

    def _template_tokens(self):
        return dict(self.special_tokens)

    def _special_strings(self):
        return list(self.special_ids)

    def _encode_with_offsets(self, text):
        return _sp_encode_with_offsets(self._sp, text, self.special_ids)
