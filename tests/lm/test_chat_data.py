"""Data pipelines with a checkpoint's tokenizer and chat template: multi-turn SFT masks every assistant turn,
preference rows split prompt and reply where the template does, prompts end with the generation prompt."""
import copy
import json
import os

import numpy as np
import pytest
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from lm import data
from lm import tokenizers as toks
from lm.data import chat

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"},
                {"role": "assistant", "content": "Rome, since 1871."}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("chatml")
    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [m["content"] for m in CONVERSATION] * 5 + ["The capital of Spain is Madrid.", "Berlin is big."]
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                              additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    hf.chat_template = CHATML
    hf.save_pretrained(root / "tok")
    return toks.load(str(root / "tok"))


def _segments(tok, ids, mask):
    """The decoded runs of masked tokens."""
    out, run = [], []
    for i, m in zip(ids, mask):
        if m:
            run.append(i)
        elif run:
            out, run = out + [tok.decode(run)], []
    return out + ([tok.decode(run)] if run else [])


def test_multi_turn_sft_trains_on_every_assistant_turn(tok, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    ds = data.sft_dataset(str(path), tok, seq_len=128, batch_size=1, seed=0, pack=False, num_epochs=1,
                          cache_dir=str(tmp_path / "cache"), eval_fraction=0.0)
    batch = next(iter(ds))
    n = int(batch["segment_ids"][0].sum())
    inputs, targets, mask = batch["inputs"][0, :n], batch["targets"][0, :n], batch["loss_mask"][0, :n]
    assert inputs.tolist() + [targets[-1]] == tok.apply_chat_template(CONVERSATION)
    assert _segments(tok, targets, mask) == ["Paris.<|im_end|>", "Rome, since 1871.<|im_end|>"]
    assert chat.stop_id(tok) == tok.token_id("<|im_end|>") != tok.eos_id


def test_preference_rows_split_prompt_and_reply_where_the_template_does(tok, tmp_path):
    path = tmp_path / "prefs.jsonl"
    prompt = CONVERSATION[:4]
    row = {"chosen": prompt + [{"role": "assistant", "content": "Rome."}],
           "rejected": prompt + [{"role": "assistant", "content": "Madrid."}]}
    path.write_text(json.dumps(row) + "\n")
    ds = data.preference_dataset(str(path), tok, seq_len=128, k=2, batch_size=1, seed=0, num_epochs=1,
                                 cache_dir=str(tmp_path / "cache"), eval_fraction=0.0)
    b = next(iter(ds))
    want_prompt = tok.apply_chat_template(prompt, add_generation_prompt=True)
    for slot, reply in enumerate(("Rome.", "Madrid.")):
        n, p = int(b["lengths"][0, slot]), int(b["prompt_len"][0, slot])
        ids = b["tokens"][0, slot, :n].tolist()
        assert p == len(want_prompt) and ids[:p] == want_prompt
        assert tok.decode(ids[p:]) == reply + "<|im_end|>"  # the newline after the end of turn opens the next
        assert ids[int(b["last_index"][0, slot])] == chat.stop_id(tok)
        assert _segments(tok, b["targets"][0, slot], b["loss_mask"][0, slot]) == [reply + "<|im_end|>"]
    assert b["ranks"][0].tolist() == [0, 1]


def test_prompts_end_with_the_generation_prompt(tok, tmp_path):
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "Capital of France?"}) + "\n")
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    for name, messages in (("prompts", [CONVERSATION[1]]), ("chat", CONVERSATION[:4])):
        got = data.read_prompts(str(tmp_path / f"{name}.jsonl"), tok, width=64)
        assert [g.tolist() for g in got] == [tok.apply_chat_template(messages, add_generation_prompt=True)]
    with pytest.raises(ValueError, match=r"prompts.jsonl:1: the formatted prompt has \d+ tokens"):
        data.read_prompts(str(tmp_path / "prompts.jsonl"), tok, width=4)


def test_a_template_that_does_not_render_prompt_then_reply_is_refused(tok):
    bad = copy.copy(tok)
    for cached in ("_compiled_template", "_end_of_turn"):
        bad.__dict__.pop(cached, None)
    bad.chat_template = ("{% for m in messages|reverse %}{{ m['role'] + ':' + m['content'] + '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")  # newest turn first
    with pytest.raises(ValueError, match="cannot split prompt and reply"):
        chat.format_response(bad, "Rome.", CONVERSATION[:2])
    np.testing.assert_array_equal(chat.format_response(tok, "Rome.", "Capital?"), tok.encode("Rome.<|im_end|>"))


def test_pretraining_documents_with_a_tokenizer_without_bos(tok, tmp_path):
    (tmp_path / "doc.txt").write_text("The capital of Spain is Madrid.\n")
    ds = data.pretrain_dataset(str(tmp_path / "doc.txt"), tok, seq_len=32, batch_size=1, seed=0, num_epochs=1,
                               cache_dir=str(tmp_path / "cache"), eval_fraction=0.0)
    b = next(iter(ds))
    n = int(b["loss_mask"][0].sum())
    assert tok.bos_id is None
    assert b["inputs"][0, :n].tolist() + [b["targets"][0, n - 1]] == tok.encode("The capital of Spain is Madrid.") + [
        tok.eos_id]


def test_a_template_without_an_end_of_turn_token_is_refused(tok):
    plain = copy.copy(tok)
    for cached in ("_compiled_template", "_end_of_turn"):
        plain.__dict__.pop(cached, None)
    plain.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ValueError, match="puts no special token of the tokenizer after an assistant reply"):
        chat.stop_id(plain)


def test_a_run_directory_takes_the_new_tokenizer_whole(tok, tmp_path):
    from lm import runs
    from lm.tokenizer import Tokenizer

    work = tmp_path / "run"
    runs.run_tokenizer(str(work), os.path.dirname(tok.path), chat_template="chatml")
    assert isinstance(toks.load(str(work)), toks.HFTokenizer) and (work / "chat_template.jinja").is_file()
    (tmp_path / "t.txt").write_text("the river begins as a thin thread of water high in the hills\n" * 30)
    own = Tokenizer.train([str(tmp_path / "t.txt")], 300, str(tmp_path / "own"))
    got = runs.run_tokenizer(str(work), own.path)  # no stale tokenizer.json or template may shadow it
    assert isinstance(got, toks.ProjectTokenizer) and sorted(os.listdir(work)) == ["tokenizer.model"]
    with pytest.raises(ValueError, match="the project tokenizer has its own chat format"):
        runs.run_tokenizer(str(work), own.path, chat_template="chatml")
