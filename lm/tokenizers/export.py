"""`save`: any tokenizer as a directory that `transformers.AutoTokenizer.from_pretrained` loads."""
from __future__ import annotations

import json
import os
from typing import Optional

from lm import tokenizer as project
from lm.tokenizers.backends import HFTokenizer, ProjectTokenizer, SentencePieceTokenizer
from lm.tokenizers.files import CONFIG, SP_MODEL, SPECIAL_MAP, TEMPLATE_FILE, TOKENIZER_JSON, _read_hf_config
from lm.tokenizers.templates import PROJECT_CHAT_TEMPLATE

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
        specials = ProjectTokenizer.special_tokens
        template, add_bos, add_eos = PROJECT_CHAT_TEMPLATE, True, False
    else:
        raise TypeError(f"lm.tokenizers.save: cannot save a {type(tokenizer).__name__}")
    _sp_to_tokenizers(model, add_bos, add_eos).save(os.path.join(directory, TOKENIZER_JSON))
    with open(os.path.join(directory, SP_MODEL), "wb") as f:
        f.write(model)
    config.update(specials, tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=False)
    _write_config(directory, config, template)
    return directory
