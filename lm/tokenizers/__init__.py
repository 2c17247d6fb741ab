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

The package: `templates` (Jinja compilation, `ChatTemplateMixin` with masks and end of turn, the built-in
templates), `backends` (the three backends), `export` (`save`, as a transformers directory), `files`
(file names, reading tokenizer_config.json); everything public is re-exported here.
"""
from __future__ import annotations

import os
from typing import Optional, Protocol, Sequence

import sentencepiece as spm

from lm import tokenizer as project
from lm.tokenizers.backends import HFTokenizer, ProjectTokenizer, SentencePieceTokenizer
from lm.tokenizers.export import save
from lm.tokenizers.files import CONFIG, SP_MODEL, SPECIAL_MAP, SPECIAL_NAMES, TEMPLATE_FILE, TOKENIZER_JSON
from lm.tokenizers.templates import (CHATML_TEMPLATE, PROJECT_CHAT_TEMPLATE, ChatTemplateMixin, chat_template_source,
                                     compile_chat_template)


class TokenizerLike(Protocol):
    """What every backend returned by `load` offers."""

    vocab_size: int
    bos_id: Optional[int]
    eos_id: Optional[int]
    pad_id: Optional[int]
    unk_id: Optional[int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


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


__all__ = ["CHATML_TEMPLATE", "CONFIG", "PROJECT_CHAT_TEMPLATE", "SPECIAL_MAP", "SPECIAL_NAMES", "SP_MODEL",
           "TEMPLATE_FILE", "TOKENIZER_JSON", "ChatTemplateMixin", "HFTokenizer", "ProjectTokenizer",
           "SentencePieceTokenizer", "TokenizerLike", "chat_template_source", "compile_chat_template", "load", "save"]
