"""Tokenizer: training, Chinese/English round trips, special tokens, load errors, the CLI."""
import os
import pickle
import subprocess
import sys

import pytest
import sentencepiece as spm

from lm.tokenizer import SPECIAL_TOKENS, Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXT = [os.path.join(REPO, "data", "text", f) for f in ("en.txt", "zh.txt")]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.train(TEXT, 1500, str(tmp_path_factory.mktemp("tok") / "tok"), character_coverage=0.995)


@pytest.mark.parametrize("text", [
    "The river begins as a thin thread of water high in the hills.",
    "河流发源于高山之上。春天的阳光融化了积雪，雪水顺着石缝流下。",
    "Mixed 中英文 text: 2 + 2 = 4，对吗？",
    "  leading spaces, double  spaces,\ttabs\nand\n\nnewlines  ",
    "Unseen characters: 龘 𠀀 ñ ß 🙂 ∑",
    "[MASK] <|user|> </s> look like special tokens but are text",
    "",
])
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.unk_id not in ids  # byte fallback: nothing is unknown
    assert not set(ids) & set(tok.special_ids.values())  # special tokens only come from ids


def test_byte_fallback_used_for_unseen_characters(tok):
    pieces = [tok.id_to_piece(i) for i in tok.encode("龘")]
    assert pieces[-3:] == ["<0xE9>", "<0xBE>", "<0x98>"]  # the UTF-8 bytes of U+9F98


def test_seen_words_are_merged(tok):
    assert len(tok.encode("the river")) < len("the river") / 2
    assert len(tok.encode("河流")) <= 3


def test_special_ids(tok):
    ids = tok.special_ids
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert len(set(ids.values())) == len(ids) == 4 + len(SPECIAL_TOKENS)
    named = [tok.mask_id, tok.gmask_id, tok.sop_id, tok.eop_id, tok.system_id, tok.user_id, tok.assistant_id]
    assert [tok.id_to_piece(i) for i in named] == list(SPECIAL_TOKENS)
    assert tok.vocab_size == len(tok) == 1500
    assert tok.encode("hi", bos=True, eos=True)[0] == tok.bos_id and tok.encode("hi", eos=True)[-1] == tok.eos_id
    assert tok.decode([tok.user_id] + tok.encode("hi") + [tok.eos_id]) == "hi"


def test_load_and_pickle(tok):
    again = Tokenizer.load(tok.path[:-len(".model")])  # the prefix works too
    text = "Bread needs flour, water, salt and yeast. 面包需要面粉。"
    assert again.encode(text) == tok.encode(text)
    assert pickle.loads(pickle.dumps(tok)).encode(text) == tok.encode(text)


def test_load_errors(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match=r"tokenizer file .*missing\.model does not exist"):
        Tokenizer.load(str(tmp_path / "missing.model"))
    bad = tmp_path / "corrupt.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match=r"corrupt\.model is not a valid SentencePiece model"):
        Tokenizer.load(str(bad))
    # A valid SentencePiece model without the project's special tokens is refused too.
    plain = tmp_path / "plain"
    spm.SentencePieceTrainer.train(input=TEXT[0], model_prefix=str(plain), vocab_size=300, minloglevel=2)
    with pytest.raises(ValueError, match=r"lacks the special tokens .*\[MASK\]"):
        Tokenizer.load(str(plain) + ".model")


def test_train_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        Tokenizer.train([str(tmp_path / "nope.txt")], 1000, str(tmp_path / "t"))
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        Tokenizer.train(TEXT, 100, str(tmp_path / "t"))


def test_cli(tmp_path):
    out = tmp_path / "cli" / "tok"
    result = subprocess.run(
        [sys.executable, "-m", "experiments.tokenizer", f"--input={os.path.join(REPO, 'data', 'text')}",
         "--vocab_size=1200", f"--output={out}", "--character_coverage=0.99"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    tok = Tokenizer.load(str(out) + ".model")
    assert tok.vocab_size == 1200
    assert tok.decode(tok.encode("天空为什么是蓝色的？")) == "天空为什么是蓝色的？"


@pytest.mark.parametrize("make_input, message", [
    (lambda d: "/no/such/dir", "--input /no/such/dir does not exist"),
    (lambda d: str(d), "holds no .txt files"),
])
def test_cli_input_errors(tmp_path, make_input, message):
    # Run as a user would: launchers define absl flags at import, so they are not imported into the test process.
    result = subprocess.run(
        [sys.executable, "-m", "experiments.tokenizer", f"--input={make_input(tmp_path)}",
         f"--output={tmp_path / 'tok'}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert not (tmp_path / "tok.model").exists()
