"""Data: chat template, tfds builders (splits, caching, malformed rows) and grain pipelines."""
import collections
import json
import logging
import os

import jax
import numpy as np
import pytest

from lm import data, kernels
from lm.data import builders
from lm.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXT_DIR = os.path.join(REPO, "data", "text")
SFT = os.path.join(REPO, "data", "sft", "sample.jsonl")
PREF = os.path.join(REPO, "data", "preference", "sample.jsonl")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    files = [os.path.join(TEXT_DIR, f) for f in ("en.txt", "zh.txt")]
    return Tokenizer.train(files, 1500, str(tmp_path_factory.mktemp("tok") / "tok"), character_coverage=0.995)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return str(path)


def take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ---- chat template ----

def test_chat_template(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Again"},
                {"role": "assistant", "content": "Hi."}]
    ids, mask = data.format_chat(tok, messages)
    expected = ([tok.bos_id, tok.system_id] + tok.encode("Be brief.") + [tok.user_id] + tok.encode("你好")
                + [tok.assistant_id] + tok.encode("Hello!") + [tok.eos_id] + [tok.user_id] + tok.encode("Again")
                + [tok.assistant_id] + tok.encode("Hi.") + [tok.eos_id])
    assert ids.tolist() == expected
    # The loss covers exactly the two replies and their eos.
    assert ids[mask == 1].tolist() == tok.encode("Hello!") + [tok.eos_id] + tok.encode("Hi.") + [tok.eos_id]
    prompt = data.format_prompt(tok, "Again", system="Be brief.", history=messages[1:3])
    assert prompt[-1] == tok.assistant_id
    assert np.concatenate([prompt, data.format_response(tok, "Hi.")]).tolist() == expected
    with pytest.raises(ValueError, match="message 0: role 'bot'"):
        data.format_chat(tok, [{"role": "bot", "content": "x"}])
    with pytest.raises(ValueError, match="message 1: a system message may only come first"):
        data.format_chat(tok, [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}])


# ---- builders ----

def test_text_builder_documents_splits_and_cache(tmp_path, cache):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("\ufefffirst doc line one\r\nline two\n\n\nsecond doc\n")
    (tmp_path / "sub" / "b.txt").write_text("\n".join(f"doc {i}\n" for i in range(40)))
    (tmp_path / "ignored.md").write_text("not text data")
    train = builders.data_source("text", str(tmp_path), "train", cache_dir=cache, eval_fraction=0.2)
    held = builders.data_source("text", str(tmp_path), "eval", cache_dir=cache, eval_fraction=0.2)
    records = [src[i] for src in (train, held) for i in range(len(src))]
    docs = {r["source"].decode(): r["text"].decode() for r in records}
    assert len(docs) == 42 and len(train) + len(held) == 42 and 0 < len(held) < 21
    assert docs["a.txt:1"] == "first doc line one\nline two" and docs["a.txt:5"] == "second doc"
    assert docs[os.path.join("sub", "b.txt") + ":3"] == "doc 1"
    # The split is a function of content: another cache dir gives the same held-out documents.
    other = builders.data_source("text", str(tmp_path), "eval", cache_dir=cache + "-other", eval_fraction=0.2)
    assert sorted(other[i]["source"] for i in range(len(other))) == sorted(held[i]["source"] for i in range(len(held)))
    # Prepared once and reused; a changed input file is prepared again.
    first = builders.prepare("text", str(tmp_path), cache_dir=cache, eval_fraction=0.2).data_dir
    assert builders.prepare("text", str(tmp_path), cache_dir=cache, eval_fraction=0.2).data_dir == first
    (tmp_path / "a.txt").write_text("changed\n")
    assert builders.prepare("text", str(tmp_path), cache_dir=cache, eval_fraction=0.2).data_dir != first


def test_small_data_still_has_a_held_out_example(cache):
    held = builders.data_source("sft", SFT, "eval", cache_dir=cache)
    train = builders.data_source("sft", SFT, "train", cache_dir=cache)
    assert len(held) >= 1 and len(held) + len(train) == sum(1 for line in open(SFT) if line.strip())


@pytest.mark.parametrize("kind,rows,line,message", [
    ("sft", [{"prompt": "a", "response": "b"}, "{not json"], 2, "invalid JSON"),
    ("sft", [{"prompt": "a", "response": "b"}, "", {"prompt": "a"}], 3, "missing key 'response'"),
    ("sft", [{"prompt": 1, "response": "b"}], 1, "'prompt' must be a string"),
    ("sft", [{"prompt": "a", "response": "  "}], 1, "'response' is empty"),
    ("sft", ["[1, 2]"], 1, "expected a JSON object"),
    ("preference", [{"prompt": "a", "chosen": "x", "rejected": "y"}, {"prompt": "a", "responses": ["x", "y"],
                                                                      "ranks": [0]}], 2, "2 responses but 1 ranks"),
    ("preference", [{"prompt": "a", "responses": ["x", "y"], "ranks": [1, 1]}], 1, "express no preference"),
    ("preference", [{"prompt": "a", "responses": ["x", "y"], "ranks": [0, -1]}], 1, "non-negative integers"),
    ("preference", [{"prompt": "a", "chosen": "x", "rejected": "y", "ranks": [0, 1]}], 1, "not both"),
    ("preference", [{"prompt": "a", "chosen": "x"}], 1, "missing key 'rejected'"),
])
def test_malformed_rows_name_file_and_line(tmp_path, cache, kind, rows, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=rf"bad\.jsonl:{line}: .*{message}"):
        builders.prepare(kind, path, cache_dir=cache)


def test_invalid_utf8_and_missing_paths(tmp_path, cache):
    (tmp_path / "t.txt").write_bytes(b"fine\n\xff\xfe broken\n")
    with pytest.raises(ValueError, match=r"t\.txt:2: not valid UTF-8"):
        builders.prepare("text", str(tmp_path / "t.txt"), cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        builders.prepare("sft", str(tmp_path / "none.jsonl"), cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="no .jsonl files"):
        builders.prepare("sft", str(tmp_path), cache_dir=cache)


def test_missing_split_and_empty_shard_errors(tmp_path, tok, cache):
    path = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "a", "response": "b"}])
    with pytest.raises(ValueError, match="has no 'eval' examples"):
        data.sft_dataset(path, tok, seq_len=32, batch_size=1, seed=0, split="eval", cache_dir=cache)
    with pytest.raises(ValueError, match="none left for process 1 of 2"):
        data.sft_dataset(path, tok, seq_len=32, batch_size=1, seed=0, process_index=1, process_count=2,
                         cache_dir=cache)


# ---- pretraining ----

def test_causal_epoch_keeps_every_token_and_shards_are_disjoint(tok, cache):
    expected = collections.Counter()
    src = builders.data_source("text", TEXT_DIR, "train", cache_dir=cache)
    for i in range(len(src)):
        expected.update(tok.encode(src[i]["text"].decode(), bos=True))
    seen = collections.Counter()
    for process in range(2):
        ds = data.pretrain_dataset(TEXT_DIR, tok, seq_len=64, batch_size=4, seed=3, process_index=process,
                                   process_count=2, num_epochs=1, cache_dir=cache)
        for b in ds:
            seg, pos = b["segment_ids"], b["positions"]
            seen.update(b["inputs"][seg > 0].tolist())
            np.testing.assert_array_equal(b["loss_mask"], (seg > 0).astype(np.float32))
            # Next-token targets inside each document; positions restart at every document.
            same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
            np.testing.assert_array_equal(b["targets"][:, :-1][same], b["inputs"][:, 1:][same])
            np.testing.assert_array_equal(pos[:, 1:][same], pos[:, :-1][same] + 1)
            starts = b["inputs"] == tok.bos_id
            assert np.all(pos[starts] == 0)
    assert seen == expected


def test_glm_batches(tok, cache):
    b = take(data.pretrain_dataset(TEXT_DIR, tok, seq_len=96, batch_size=8, seed=0, objective="glm",
                                   gmask_prob=0.5, cache_dir=cache), 1)[0]
    assert b["positions"].shape == (8, 96, 2) and b["prefix_len"].shape == (8,)
    t = np.arange(96)
    modes = set()
    for row in range(8):
        a, seg = b["prefix_len"][row], b["segment_ids"][row]
        np.testing.assert_array_equal(b["loss_mask"][row], ((t >= a) & (seg > 0)).astype(np.float32))
        np.testing.assert_array_equal(b["positions"][row, :a, 0], np.arange(a))
        inputs, part_b = b["inputs"][row], slice(a, int(seg.sum()))
        masks = np.isin(inputs[:a], [tok.mask_id, tok.gmask_id])
        sops = inputs[part_b] == tok.sop_id
        assert masks.sum() == sops.sum() == (b["targets"][row, part_b] == tok.eop_id).sum() >= 1
        assert np.all(b["positions"][row, part_b, 1][sops] == 1)
        # Each span points at a mask token of part A.
        assert np.all(masks[b["positions"][row, part_b, 0]])
        modes.add(bool((inputs[:a] == tok.gmask_id).any()))
    assert modes == {True, False}
    with pytest.raises(ValueError, match="objective 'mlm'"):
        data.pretrain_dataset(TEXT_DIR, tok, seq_len=96, batch_size=8, seed=0, objective="mlm", cache_dir=cache)


# ---- iterator state, seeds ----

@pytest.mark.parametrize("make", [
    lambda tok, c: data.pretrain_dataset(TEXT_DIR, tok, seq_len=32, batch_size=2, seed=1, cache_dir=c),
    lambda tok, c: data.pretrain_dataset(TEXT_DIR, tok, seq_len=48, batch_size=2, seed=1, objective="glm",
                                         cache_dir=c),
    lambda tok, c: data.sft_dataset(SFT, tok, seq_len=96, batch_size=2, seed=1, cache_dir=c),
    lambda tok, c: data.preference_dataset(PREF, tok, seq_len=96, k=4, batch_size=2, seed=1, cache_dir=c),
], ids=["causal", "glm", "sft", "preference"])
def test_iterator_state_resumes_exactly(tok, cache, make):
    it = iter(make(tok, cache))
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # survives a JSON checkpoint
    after = [next(it) for _ in range(12)]  # past an epoch of the small sets
    resumed = iter(make(tok, cache))
    resumed.set_state(state)
    assert_batches_equal(after, [next(resumed) for _ in range(12)])


def test_seed_controls_order(tok, cache):
    def first(seed):
        return take(data.sft_dataset(SFT, tok, seq_len=96, batch_size=2, seed=seed, pack=False, cache_dir=cache), 3)
    assert_batches_equal(first(5), first(5))
    assert any(not np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(first(5), first(6)))


# ---- SFT ----

def sft_segments(batch):
    """(inputs, targets, loss_mask) of every packed example in a batch."""
    out = []
    for row in range(batch["inputs"].shape[0]):
        seg = batch["segment_ids"][row]
        for s in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s)
            assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1))  # contiguous
            np.testing.assert_array_equal(batch["positions"][row, idx], np.arange(len(idx)))
            out.append((batch["inputs"][row, idx], batch["targets"][row, idx], batch["loss_mask"][row, idx]))
    return out


@pytest.mark.parametrize("pack", [True, False])
def test_sft_epoch_trains_each_response_once(tok, cache, pack):
    src = builders.data_source("sft", SFT, "train", cache_dir=cache)
    responses = [json.loads(src[i]["messages"])[-1]["content"] for i in range(len(src))]
    want = collections.Counter(tuple(tok.encode(r) + [tok.eos_id]) for r in responses)
    got, rows = collections.Counter(), 0
    for b in data.sft_dataset(SFT, tok, seq_len=80, batch_size=3, seed=0, pack=pack, num_epochs=1, cache_dir=cache):
        rows += int((b["segment_ids"].max(axis=1) > 0).sum())
        for inputs, targets, mask in sft_segments(b):
            assert inputs[0] == tok.bos_id
            got[tuple(targets[mask == 1].tolist())] += 1
            # The loss starts right after <|assistant|>: nothing of the prompt is trained on.
            first = np.flatnonzero(mask)[0]
            assert inputs[first] == tok.assistant_id and not mask[:first].any()
    assert got == want
    assert (rows < len(src)) == pack  # packing puts several examples in a row


def test_packed_attention_never_crosses_examples(tok, cache):
    """Attention (the model's kernel, RoPE at the batch's positions) over a packed row equals attention
    over each example alone."""
    b = take(data.sft_dataset(SFT, tok, seq_len=96, batch_size=1, seed=0, cache_dir=cache), 1)[0]
    n = b["segment_ids"].max()
    assert n >= 2
    # Row 0: the packed row; row s: example s alone, right-padded, at positions 0, 1, ...
    idx = [np.flatnonzero(b["segment_ids"][0] == s) for s in range(1, n + 1)]
    inputs, positions, segments = (np.zeros((n + 1, 96), np.int32) for _ in range(3))
    inputs[0], positions[0], segments[0] = b["inputs"][0], b["positions"][0], b["segment_ids"][0]
    for s, i in enumerate(idx, 1):
        inputs[s, :len(i)], positions[s, :len(i)], segments[s, :len(i)] = b["inputs"][0, i], np.arange(len(i)), 1
    table = jax.random.normal(jax.random.key(0), (3, tok.vocab_size, 2, 8))

    @jax.jit
    def attend(inputs, positions, segment_ids):
        q, k, v = (kernels.rope(t[inputs], positions) for t in table)
        return kernels.flash_attention(q, k, v, segment_ids=segment_ids)

    out = np.asarray(attend(inputs, positions, segments))
    for s, i in enumerate(idx, 1):
        np.testing.assert_allclose(out[0, i], out[s, :len(i)], atol=1e-5, rtol=1e-5)


def test_overlong_examples(tmp_path, tok, cache, caplog):
    rows = [{"prompt": "short", "response": "ok"}, {"prompt": "tell me", "response": "word " * 80}]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    with pytest.raises(ValueError, match=r"long\.jsonl:2 has \d+ tokens after formatting, more than seq_len=32"):
        list(data.sft_dataset(path, tok, seq_len=32, batch_size=2, seed=0, num_epochs=1, eval_fraction=0,
                              cache_dir=cache))
    with caplog.at_level(logging.WARNING):
        batches = list(data.sft_dataset(path, tok, seq_len=32, batch_size=2, seed=0, num_epochs=1, eval_fraction=0,
                                        overlong="truncate", cache_dir=cache))
    # Example 1 keeps "ok" + eos; example 2 keeps its first 32 inputs, of which bos, <|user|>, the prompt and
    # <|assistant|> (minus the one shift) carry no loss.
    kept = len(tok.encode("ok")) + 1 + 32 - (2 + len(tok.encode("tell me")))
    assert sum(int(b["loss_mask"].sum()) for b in batches) == kept
    assert any("truncated example long.jsonl:2" in r.getMessage() and "1 truncated so far" in r.getMessage()
               for r in caplog.records)
    path = write_jsonl(tmp_path / "prompt.jsonl", [{"prompt": "word " * 80, "response": "ok"}])
    with pytest.raises(ValueError, match=r"prompt\.jsonl:1: the prompt alone fills seq_len=32"):
        list(data.sft_dataset(path, tok, seq_len=32, batch_size=1, seed=0, num_epochs=1, eval_fraction=0,
                              overlong="truncate", cache_dir=cache))


# ---- preferences ----

def test_preference_batches(tmp_path, tok, cache):
    rows = [{"prompt": "Why does ice float?", "responses": ["cold", "less dense", "it floats", "heavier"],
             "ranks": [1, 0, 1, 2]},
            {"prompt": "2+2?", "chosen": "4", "rejected": "5"}]
    path = write_jsonl(tmp_path / "pref.jsonl", rows)
    b = take(data.preference_dataset(path, tok, seq_len=40, k=4, batch_size=2, seed=0, num_epochs=1,
                                     eval_fraction=0, cache_dir=cache), 1)[0]
    two = 0 if b["ranks"][0, 2] == -1 else 1  # the K=2 row has absent slots
    four = 1 - two
    assert b["ranks"][four].tolist() == [0, 1, 1, 2] and b["ranks"][two].tolist() == [0, 1, -1, -1]
    assert b["lengths"][two, 2:].tolist() == [0, 0] and not b["tokens"][two, 2:].any()
    prompt = data.format_prompt(tok, "Why does ice float?")
    for slot, text in enumerate(["less dense", "cold", "it floats", "heavier"]):
        seq = np.concatenate([prompt, data.format_response(tok, text)])
        n = b["lengths"][four, slot]
        assert b["tokens"][four, slot, :n].tolist() == seq.tolist() and b["last_index"][four, slot] == n - 1
        assert b["tokens"][four, slot, n - 1] == tok.eos_id and b["prompt_len"][four, slot] == len(prompt)
        mask = b["loss_mask"][four, slot] == 1
        assert b["targets"][four, slot][mask].tolist() == data.format_response(tok, text).tolist()
    # Pairs: every strict preference once, ties and absent responses excluded.
    for r in (four, two):
        ranks = b["ranks"][r]
        pairs = zip(b["chosen_index"][r], b["rejected_index"][r], b["pair_mask"][r])
        got = {(int(c), int(j)) for c, j, m in pairs if m}
        want = {(i, j) for i in range(4) for j in range(4) if ranks[i] >= 0 and ranks[j] >= 0 and ranks[i] < ranks[j]}
        assert got == want
    pairs = data.preference_pairs(b)
    on_device = jax.jit(data.preference_pairs)(jax.tree.map(jax.numpy.asarray, b))
    jax.tree.map(np.testing.assert_array_equal, on_device, pairs)
    assert pairs["chosen"]["inputs"].shape == (12, 40) and pairs["pair_mask"].shape == (12,)
    valid = pairs["pair_mask"] == 1
    assert valid.sum() == 6 and np.all(pairs["chosen"]["ranks"][valid] < pairs["rejected"]["ranks"][valid])
    with pytest.raises(ValueError, match=r"pref\.jsonl:1 has 4 responses, more than k=3"):
        list(data.preference_dataset(path, tok, seq_len=40, k=3, batch_size=2, seed=0, num_epochs=1,
                                     eval_fraction=0, cache_dir=cache))


def test_bundled_preference_data(tok, cache):
    n = sum(1 for line in open(PREF) if line.strip())
    seen = 0
    for split in ("train", "eval"):
        for b in data.preference_dataset(PREF, tok, seq_len=96, k=4, batch_size=4, seed=0, split=split,
                                         num_epochs=1, cache_dir=cache):
            present = b["ranks"][:, 0] >= 0
            seen += int(present.sum())
            assert np.all(b["pair_mask"][present].sum(axis=1) >= 1)
    assert seen == n
