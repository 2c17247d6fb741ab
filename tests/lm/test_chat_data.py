"""Data pipelines with a checkpoint's tokenizer and chat template: multi-turn SFT masks every assistant turn,
preference rows split prompt and reply where the template does, prompts end with the generation prompt."""
import copy
import json

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
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
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
    bad.__dict__.pop("_compiled_template", None)
    bad.chat_template = ("{% for m in messages|reverse %}{{ m['role'] + ':' + m['content'] + '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")  # newest turn first
    with pytest.raises(ValueError, match="cannot split prompt and reply"):
        chat.format_response(bad, "Rome.", CONVERSATION[:2])
    np.testing.assert_array_equal(chat.format_response(tok, "Rome.", "Capital?"), tok.encode("Rome.<|im_end|>"))
