"""lm.tokenizers: HF and SentencePiece backends against transformers, chat templates and masks, load errors."""
import copy
import json
import os

import numpy as np
import pytest
import sentencepiece as spm
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from lm import tokenizers as toks
from lm.data import chat as chat_data
from lm.data.chat import format_chat
from lm.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORDS = ("the river begins as a thin thread of water high in the hills and flows to the sea "
         "High Where You are terse def encode(text): return [ord(c) for c in text] if x == 1 else None # comment").split()
ZH = "河流发源于高山之上。春天的阳光融化了积雪，雪水顺着石缝流下？"
CORPUS = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(5 + i % 9)) + " " + ZH[i % 20:i % 20 + 6]
          + ("\n\tindent  two" if i % 5 == 0 else "") + (" 🙂" if i % 11 == 0 else "") for i in range(300)]
TEXTS = [
    "The river begins as a thin thread of water.",
    "河流发源于高山之上。春天的阳光融化了积雪，雪水流下。",
    "Mixed 中英文 text: 2 + 2 = 4，对吗？ 🙂👍🏽",
    "def f(x):\n\treturn  x ** 2  # square\n\n\nprint(f(3))",
    "  leading spaces, double  spaces,\ttabs\nand\n\nnewlines  ",
    "Unseen: 龘 𠀀 ñ ß ∑",
]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] "
          "+ '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Where does the river begin?"},
        {"role": "assistant", "content": "High in the hills 🙂"},
        {"role": "user", "content": "河流发源于哪里？"},
        {"role": "assistant", "content": "高山之上。\n\tthe end"}]


def _save(tok, directory, template=None, **specials):
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    if template:
        hf.chat_template = template
    hf.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("toks")
    # (a) BPE with a whitespace pre-tokenizer and ChatML special tokens.
    bpe = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.decoder = decoders.Metaspace()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=[
        "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    # (b) GPT-2 style byte-level BPE with Llama-3 style special tokens.
    byte = tokenizers.Tokenizer(models.BPE())
    byte.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte.decoder = decoders.ByteLevel()
    byte.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[
            "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]))
    # (c) a Llama-2 style SentencePiece model: unk=0, bos=1, eos=2, no pad.
    with open(root / "corpus.txt", "w") as f:
        f.write("\n".join(CORPUS))
    spm.SentencePieceTrainer.train(input=str(root / "corpus.txt"), model_prefix=str(root / "llama"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, split_digits=True, minloglevel=2)
    (root / "sp").mkdir()
    (root / "sp" / "tokenizer.model").write_bytes((root / "llama.model").read_bytes())
    transformers.LlamaTokenizer.from_pretrained(root / "sp").save_pretrained(root / "c")
    return {"a": _save(bpe, root / "a", CHATML, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                       unk_token="<unk>", additional_special_tokens=["<|im_start|>"]),
            "b": _save(byte, root / "b", LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                       additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>"]),
            "c": str(root / "c"), "model": str(root / "llama.model"), "root": root}


@pytest.mark.parametrize("kind", ["a", "b", "c"])
def test_encode_decode_match_transformers(dirs, kind):
    ours, ref = toks.load(dirs[kind]), transformers.AutoTokenizer.from_pretrained(dirs[kind])
    assert isinstance(ours, toks.HFTokenizer) and ours.vocab_size == len(ref)
    for text in TEXTS + ["<|im_end|> and <|eot_id|> as text"]:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == ref.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text
    for name in ("bos", "eos", "unk"):
        assert getattr(ours, f"{name}_id") == getattr(ref, f"{name}_token_id"), name


def test_special_ids_and_pad_convention(dirs):
    a, b, c = (toks.load(dirs[k]) for k in "abc")
    assert (a.bos_id, a.pad_id, a.pad_is_eos) == (None, a.encode("<|endoftext|>")[0], False)
    assert b.bos_id == b.encode("<|begin_of_text|>")[0] and b.unk_id is None
    assert b.pad_is_eos and b.pad_id == b.eos_id == b.encode("<|eot_id|>")[0]
    assert (c.unk_id, c.bos_id, c.eos_id, c.pad_id, c.pad_is_eos) == (0, 1, 2, 2, True)


def test_bare_sentencepiece_model(dirs):
    sp, ref = toks.load(dirs["model"]), transformers.AutoTokenizer.from_pretrained(dirs["c"])
    assert isinstance(sp, toks.SentencePieceTokenizer)
    assert (sp.unk_id, sp.bos_id, sp.eos_id, sp.pad_id, sp.vocab_size) == (0, 1, 2, 2, 400)
    # transformers' Llama conversion adds no dummy prefix to text starting with a space; SentencePiece does.
    for text in (t for t in TEXTS if not t[0].isspace()):
        assert sp.encode(text) == ref.encode(text, add_special_tokens=False), text
        assert sp.decode(sp.encode(text)) == text
    assert sp.decode([1] + sp.encode("the sea") + [2]) == "<s>the sea</s>"
    assert sp.decode([1] + sp.encode("the sea") + [2], skip_special_tokens=True) == "the sea"
    # a directory with tokenizer.model and tokenizer_config.json (no tokenizer.json) takes the config's tokens
    d = dirs["root"] / "sp_dir"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(open(dirs["model"], "rb").read())
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<s>"}, "eos_token": "</s>",
                                                         "pad_token": "<unk>", "chat_template": CHATML}))
    spd = toks.load(str(d))
    assert isinstance(spd, toks.SentencePieceTokenizer) and (spd.bos_id, spd.eos_id, spd.pad_id) == (1, 2, 0)
    assert "<|im_start|>user" in spd.render_chat_template(CHAT[:2])


@pytest.mark.parametrize("kind", ["a", "b"])
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_chat_template_matches_transformers(dirs, kind, generation_prompt):
    ours, ref = toks.load(dirs[kind]), transformers.AutoTokenizer.from_pretrained(dirs[kind])
    for chat in (CHAT, CHAT[1:3], CHAT[:4]):
        expected = ref.apply_chat_template(chat, tokenize=True, add_generation_prompt=generation_prompt,
                                           return_dict=False)
        assert ours.apply_chat_template(chat, add_generation_prompt=generation_prompt) == list(expected)
        assert ours.render_chat_template(chat, generation_prompt) == ref.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=generation_prompt)


@pytest.mark.parametrize("kind,end", [("a", "<|im_end|>"), ("b", "<|eot_id|>")])
def test_assistant_mask(dirs, kind, end):
    tok = toks.load(dirs[kind])
    ids, mask = tok.apply_chat_template(CHAT, return_assistant_mask=True)
    assert ids == tok.apply_chat_template(CHAT) and len(mask) == len(ids) and set(mask) <= {0.0, 1.0}
    runs, run = [], []
    for i, m in zip(ids, mask):
        if m:
            run.append(i)
        elif run:
            runs, run = runs + [run], []
    assert [tok.decode(r) for r in runs + ([run] if run else [])] == [
        "High in the hills 🙂" + end, "高山之上。\n\tthe end" + end]


def test_project_tokenizer_template_equals_format_chat(tmp_path):
    trained = Tokenizer.train([os.path.join(REPO, "data", "text", f) for f in ("en.txt", "zh.txt")], 1500,
                              str(tmp_path / "tokenizer"), character_coverage=0.99)
    tok = toks.load(str(tmp_path))  # a run directory holds tokenizer.model
    assert isinstance(tok, toks.ProjectTokenizer) and isinstance(tok, Tokenizer)
    assert isinstance(toks.load(trained.path), toks.ProjectTokenizer)
    for chat in (CHAT, CHAT[1:], [{"role": "user", "content": ""}, {"role": "assistant", "content": " x  "}]):
        ids, mask = tok.apply_chat_template(chat, return_assistant_mask=True)
        ref_ids, ref_mask = format_chat(trained, chat)
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_array_equal(mask, ref_mask)
    prompt = tok.apply_chat_template(CHAT[:2], add_generation_prompt=True)
    assert prompt[-1] == tok.assistant_id and prompt == format_chat(trained, CHAT[:2])[0].tolist() + [prompt[-1]]


def test_errors_name_the_path(tmp_path, dirs):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        toks.load(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing"):
        toks.load(str(tmp_path / "missing"))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        toks.load(str(tmp_path))
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model"):
        toks.load(str(tmp_path / "bad.model"))
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"junk")
    with pytest.raises(ValueError, match="tokenizer.model"):
        toks.load(str(tmp_path))
    (tmp_path / "tokenizer.model").write_bytes(open(dirs["model"], "rb").read())
    (tmp_path / "tokenizer_config.json").write_text("[1]")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        toks.load(str(tmp_path))


LLAMA2 = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
          "{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}{% else %}"
          "{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}")


def test_llama2_template_replies_keep_their_in_context_ids_and_end_with_eos(dirs, tmp_path):
    """SentencePiece tokenizes a reply after `[/INST]` as `▁Hello` in context but `▁▁Hello` alone: the reply's ids
    are the in-context ones; Llama-2 puts ' ' before eos, and eos is still trained and still ends generation."""
    d = tmp_path / "llama2"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(open(dirs["model"], "rb").read())
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                         "chat_template": LLAMA2}))
    tok = toks.load(str(d))
    prompt = [{"role": "user", "content": "Where does the river begin?"}]
    reply = "High in the hills"
    whole, mask = tok.apply_chat_template(prompt + [{"role": "assistant", "content": reply}],
                                          return_assistant_mask=True)
    head = chat_data.prompt_ids(tok, prompt).tolist()
    got = chat_data.format_response(tok, reply, prompt).tolist()
    assert whole == head + got and got != tok.encode(" " + reply + " </s>")
    assert got[-1] == tok.eos_id == chat_data.stop_id(tok)
    assert mask == [0.0] * len(head) + [1.0] * len(got)


def test_template_errors_name_the_tokenizer(dirs):
    tok = copy.copy(toks.load(dirs["a"]))
    tok.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(ValueError, match=r"chat template of .*tokenizer.json: Conversation roles must alternate"):
        tok.apply_chat_template(CHAT)
