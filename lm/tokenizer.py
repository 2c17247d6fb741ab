"""A SentencePiece BPE tokenizer with byte fallback and the special tokens the training stages need.

Ids 0-3 are pad, unk, bos, eos; then the control tokens in `SPECIAL_TOKENS` (GLM blank infilling and chat
roles). Control tokens are never produced from text: `encode("[MASK]")` gives ordinary pieces, and the
data code inserts special tokens by id, so user text cannot forge a role marker.

`load(path)` reads any tokenizer (this one, any SentencePiece model, a Hugging Face `tokenizer.json`) behind
one interface (`lm.tokenizers`); `Tokenizer.train` trains this project's own.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import sentencepiece as spm

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
# GLM blank infilling: short-span mask, generation mask, start of a span, end of a span.
MASK, GMASK, SOP, EOP = "[MASK]", "[gMASK]", "[sop]", "[eop]"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = (MASK, GMASK, SOP, EOP, SYSTEM, USER, ASSISTANT)


def missing_special_tokens(sp: spm.SentencePieceProcessor) -> list[str]:
    """The special tokens this project's tokenizers carry that SentencePiece model `sp` lacks."""
    return [t for t in (PAD, BOS, EOS, *SPECIAL_TOKENS) if sp.PieceToId(t) == sp.unk_id()]


def load(path: str):
    """Any tokenizer: a `.model` SentencePiece file (this project's or any other), a directory holding
    `tokenizer.json` / `tokenizer.model` (+ `tokenizer_config.json`), or a run directory; see `lm.tokenizers`."""
    from lm import tokenizers

    return tokenizers.load(path)


class Tokenizer:
    """Wraps a `sentencepiece.SentencePieceProcessor`; picklable (carries the model bytes)."""

    def __init__(self, model_proto: bytes, path: str = "<bytes>"):
        self.path = path
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except Exception as e:  # sentencepiece raises a bare RuntimeError/OSError for bad bytes
            raise ValueError(f"tokenizer file {path} is not a valid SentencePiece model: {e}") from e
        missing = missing_special_tokens(self._sp)
        if missing:
            raise ValueError(f"tokenizer file {path} lacks the special tokens {missing}; "
                             "train it with `Tokenizer.train` (python -m experiments.tokenizer)")
        self._ids = {t: self._sp.PieceToId(t) for t in (PAD, UNK, BOS, EOS, *SPECIAL_TOKENS)}

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        """Loads `path` (a `.model` file; `.model` is appended when `path` has no such file but `path.model` exists)."""
        if not os.path.isfile(path) and os.path.isfile(path + ".model"):
            path = path + ".model"
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file {path} does not exist; train one with "
                                    "`python -m experiments.tokenizer --input=... --vocab_size=... --output=...`")
        with open(path, "rb") as f:
            return cls(f.read(), path)

    @staticmethod
    def train(files: Sequence[str] | str, vocab_size: int, output_prefix: str, *,
              character_coverage: float = 0.9995, max_sentence_length: int = 16384,
              input_sentence_size: int = 0, num_threads: int = 2, seed: int = 0) -> "Tokenizer":
        """Trains a BPE model on text files and writes `output_prefix.model` / `.vocab`; returns it loaded.

        Byte fallback makes every string encodable (unknown characters become UTF-8 byte pieces), and the
        identity normalisation keeps text exact, so `decode(encode(s)) == s` for Chinese and English alike
        (NFKC would map full-width punctuation such as "，" to ","). Digits are split, as in LLaMA.

        Args:
          files: text files (one sentence or paragraph per line is best; long lines are skipped by
            SentencePiece past `max_sentence_length` bytes).
          vocab_size: total number of ids, special tokens and the 256 byte pieces included.
          output_prefix: path prefix of the written model.
          character_coverage: share of characters covered by ordinary pieces (the rest fall back to bytes).
          max_sentence_length: longest line, in bytes, used for training.
          input_sentence_size: sample this many lines (0 = all).
          num_threads: trainer threads.
          seed: sampling seed (fixed for reproducible vocabularies).
        """
        files = [files] if isinstance(files, str) else list(files)
        for f in files:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"tokenizer training input {f} does not exist")
        min_vocab = 4 + len(SPECIAL_TOKENS) + 256 + 1
        if vocab_size < min_vocab:
            raise ValueError(f"vocab_size={vocab_size} is too small: byte fallback and the special tokens "
                             f"alone need {min_vocab - 1} ids")
        os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
        spm.set_random_generator_seed(seed)
        try:
            spm.SentencePieceTrainer.train(
                input=files, model_prefix=output_prefix, vocab_size=vocab_size, model_type="bpe",
                byte_fallback=True, character_coverage=character_coverage, split_digits=True,
                normalization_rule_name="identity", remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True, max_sentence_length=max_sentence_length,
                input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
                pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece=PAD, unk_piece=UNK, bos_piece=BOS,
                eos_piece=EOS, control_symbols=list(SPECIAL_TOKENS), num_threads=num_threads,
                minloglevel=2)
        except RuntimeError as e:
            raise ValueError(f"SentencePiece training on {files} with vocab_size={vocab_size} failed: {e}") from e
        return Tokenizer.load(output_prefix + ".model")

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text` (special-token strings in it are plain text); optional bos/eos around it."""
        ids = self._sp.EncodeAsIds(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """Token ids of several texts."""
        return self._sp.EncodeAsIds(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens decode to nothing."""
        return self._sp.DecodeIds([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        """The vocabulary piece of id `i` (special tokens show as their names)."""
        return self._sp.IdToPiece(int(i))

    def __len__(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def vocab_size(self) -> int:
        """Number of ids."""
        return self._sp.GetPieceSize()

    @property
    def special_ids(self) -> dict[str, int]:
        """Piece -> id of every special token."""
        return dict(self._ids)

    pad_id = property(lambda self: self._ids[PAD], doc="Padding id (0).")
    unk_id = property(lambda self: self._ids[UNK], doc="Unknown-piece id (unused with byte fallback).")
    bos_id = property(lambda self: self._ids[BOS], doc="Beginning-of-sequence id.")
    eos_id = property(lambda self: self._ids[EOS], doc="End-of-sequence id; ends every response.")
    mask_id = property(lambda self: self._ids[MASK], doc="GLM `[MASK]`: a short blank in part A.")
    gmask_id = property(lambda self: self._ids[GMASK], doc="GLM `[gMASK]`: a trailing blank (generation).")
    sop_id = property(lambda self: self._ids[SOP], doc="GLM `[sop]`: starts each span in part B.")
    eop_id = property(lambda self: self._ids[EOP], doc="GLM `[eop]`: target after a span's last token.")
    system_id = property(lambda self: self._ids[SYSTEM], doc="Chat role marker `<|system|>`.")
    user_id = property(lambda self: self._ids[USER], doc="Chat role marker `<|user|>`.")
    assistant_id = property(lambda self: self._ids[ASSISTANT], doc="Chat role marker `<|assistant|>`.")

    def __getstate__(self):
        return {"proto": self._proto, "path": self.path}

    def __setstate__(self, state):
        self.__init__(state["proto"], state["path"])

    def __repr__(self):
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"
