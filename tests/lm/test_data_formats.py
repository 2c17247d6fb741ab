"""Data file formats (JSONL, JSON list, Parquet, save_to_disk) and row schemas of `lm.data.builders`."""
import gzip
import json

import datasets
import numpy as np
import pytest

from lm.data import builders, chat, schemas

datasets.disable_progress_bars()


def sys_(c):
    return {"role": "system", "content": c}


def user(c):
    return {"role": "user", "content": c}


def bot(c):
    return {"role": "assistant", "content": c}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return str(path)


def parse(kind, path, field_map=None):
    """Normalised records of one file, without tfds."""
    return [r for _, r in schemas.records(kind, str(path), builders.read_rows(str(path)),
                                          schemas.parse_field_map(field_map))]


def all_records(kind, path, cache, **kw):
    """Both splits of `path` through tfds: {row number: record}."""
    out = {}
    for split in builders.SPLITS:
        try:
            src = builders.data_source(kind, str(path), split, cache_dir=str(cache), eval_fraction=0.3, **kw)
        except ValueError as e:  # tiny data may fill only one split
            assert "has no" in str(e)
            continue
        for i in range(len(src)):
            out[int(src[i]["source"].decode().rsplit(":", 1)[1])] = src[i]
    return out


def write_all_formats(tmp_path, rows):
    """The same rows as JSONL, a JSON list, Parquet and a save_to_disk directory."""
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "rows.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    return [write_jsonl(tmp_path / "rows.jsonl", rows), str(tmp_path / "rows.json"),
            str(tmp_path / "rows.parquet"), str(tmp_path / "saved")]


SFT_ROWS = [{"messages": [user(f"question {i} ü"), bot(f"answer {i}")] + [user("more?"), bot("no.")] * (i % 3 > 0),
             "system": "Be terse." if i % 2 else None} for i in range(8)]  # null: no system message
PREF_ROWS = [{"prompt": f"prompt {i}", "responses": [f"r{j}" for j in range(2 + i % 3)],
              "ranks": [(i + j) % 2 + j // 2 for j in range(2 + i % 3)]} for i in range(8)]


@pytest.mark.parametrize("kind,rows", [("sft", SFT_ROWS), ("preference", PREF_ROWS)])
def test_every_format_gives_the_same_records(tmp_path, kind, rows):
    got = [all_records(kind, path, tmp_path / "cache") for path in write_all_formats(tmp_path, rows)]
    assert sorted(got[0]) == list(range(1, len(rows) + 1))
    for other in got[1:]:
        assert sorted(other) == sorted(got[0])
        for n, record in got[0].items():
            for key in ("messages",) if kind == "sft" else ("prompt", "responses", "ranks"):
                np.testing.assert_array_equal(other[n][key], record[key], err_msg=f"{key} of row {n}")
    if kind == "sft":
        assert json.loads(got[0][2]["messages"]) == [sys_("Be terse."), user("question 1 ü"), bot("answer 1"),
                                                      user("more?"), bot("no.")]
    else:
        assert json.loads(got[0][4]["prompt"]) == [user("prompt 3")]
        assert [r.decode() for r in got[0][4]["responses"]] == ["r0", "r1"]
        assert np.asarray(got[0][4]["ranks"]).tolist() == [1, 0]


@pytest.mark.parametrize("row,messages", [
    ({"prompt": "p", "response": "r", "system": "s"}, [sys_("s"), user("p"), bot("r")]),
    ({"instruction": "Translate.", "input": "hola", "output": "hello"}, [user("Translate.\n\nhola"), bot("hello")]),
    ({"instruction": "Say hi.", "input": "", "output": "hi"}, [user("Say hi."), bot("hi")]),
    ({"instruction": "Say hi.", "output": "hi"}, [user("Say hi."), bot("hi")]),
    ({"messages": [user("a"), bot("b"), user("c"), bot("d")], "system": "s"},
     [sys_("s"), user("a"), bot("b"), user("c"), bot("d")]),
    ({"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "a"},
                        {"from": "gpt", "value": "b"}, {"from": "user", "value": "c"},
                        {"from": "assistant", "value": "d"}]},
     [sys_("s"), user("a"), bot("b"), user("c"), bot("d")]),
])
def test_sft_schemas(tmp_path, row, messages):
    [record] = parse("sft", write_jsonl(tmp_path / "sft.jsonl", [row]))
    assert json.loads(record["messages"]) == messages


HH_CHOSEN = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: I am fine, thanks."
HH_REJECTED = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: I am not telling."


@pytest.mark.parametrize("row,prompt,responses,ranks", [
    ({"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 0, 1]}, [user("p")], ["a", "b", "c"], [1, 0, 1]),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "system": "s"}, [sys_("s"), user("p")], ["a", "b"], [0, 1]),
    ({"prompt": [user("p"), bot("q"), user("r")], "chosen": "a", "rejected": "b"},
     [user("p"), bot("q"), user("r")], ["a", "b"], [0, 1]),
    ({"prompt": "r", "chosen": [sys_("s"), user("p"), bot("q"), user("r"), bot("a")],
      "rejected": [sys_("s"), user("p"), bot("q"), user("r"), bot("b")], "score_chosen": 9.0},
     [sys_("s"), user("p"), bot("q"), user("r")], ["a", "b"], [0, 1]),
    ({"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
     [user("Hi there"), bot("Hello!"), user("How are you?")], ["I am fine, thanks.", "I am not telling."], [0, 1]),
    ({"prompt": [user("p"), bot("q"), user("r")], "chosen": [bot("a")], "rejected": [bot("b")]},  # TRL
     [user("p"), bot("q"), user("r")], ["a", "b"], [0, 1]),
    ({"prompt": "p", "chosen": [bot("a")], "rejected": [bot("b")], "system": "s"}, [sys_("s"), user("p")],
     ["a", "b"], [0, 1]),
])
def test_preference_schemas(tmp_path, row, prompt, responses, ranks):
    [record] = parse("preference", write_jsonl(tmp_path / "pref.jsonl", [row]))
    assert json.loads(record["prompt"]) == prompt
    assert record["responses"] == responses and record["ranks"].tolist() == ranks


def test_pairs_and_ranked_rows_may_mix(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "responses": ["x", "y"], "ranks": [1, 0]}]
    records = parse("preference", write_jsonl(tmp_path / "p.jsonl", rows))
    assert [r["ranks"].tolist() for r in records] == [[0, 1], [1, 0]]


def test_prompt_rows_of_prompt_sft_and_preference_files(tmp_path):
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "q1"}, {"prompt": [sys_("s"), user("q2")]}])
    (tmp_path / "sft.json").write_text(json.dumps([{"messages": [sys_("s"), user("a"), bot("b"), user("c"),
                                                                 bot("d")]}]))
    write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    datasets.Dataset.from_list([{"instruction": "i", "input": "x", "output": "o"}]).to_parquet(
        str(tmp_path / "alpaca.parquet"))
    (tmp_path / "notes.md").write_text("ignored")
    assert list(builders.prompt_rows(str(tmp_path))) == [
        ("alpaca.parquet:1", [user("i\n\nx")]),
        ("hh.jsonl:1", [user("Hi there"), bot("Hello!"), user("How are you?")]),
        ("prompts.jsonl:1", [user("q1")]), ("prompts.jsonl:2", [sys_("s"), user("q2")]),
        ("sft.json:1", [sys_("s"), user("a"), bot("b"), user("c")]),
    ]
    rows = [{"prompt": "p", "chosen": [user("p"), bot("a")], "rejected": [user("p"), bot("b")]},
            {"prompt": "q", "chosen": [user("q"), bot("a")], "rejected": [user("q"), bot("a")]}]  # no preference
    assert list(builders.prompt_rows(write_jsonl(tmp_path / "uf.jsonl", rows))) == [
        ("uf.jsonl:1", [user("p")]), ("uf.jsonl:2", [user("q")])]
    rows = [{"prompt": [user("p")], "chosen": [bot("a")], "rejected": [bot("b")]}]
    assert list(builders.prompt_rows(write_jsonl(tmp_path / "trl.jsonl", rows))) == [("trl.jsonl:1", [user("p")])]


@pytest.mark.parametrize("same,other", [
    ({"chosen": [user("p"), bot("a")], "rejected": [user("p"), bot("a")]},
     {"chosen": [user("p"), bot("a")], "rejected": [user("p"), bot("b")]}),
    ({"chosen": HH_CHOSEN, "rejected": HH_CHOSEN + " "}, {"chosen": HH_CHOSEN, "rejected": HH_REJECTED}),
    ({"prompt": "p", "chosen": "a", "rejected": "a"}, {"prompt": "p", "chosen": "a", "rejected": "b"}),
])
def test_pairs_without_preference_are_skipped_with_one_warning(tmp_path, caplog, same, other):
    path = write_jsonl(tmp_path / "pairs.jsonl", [same, other, same, other])
    [expected] = parse("preference", write_jsonl(tmp_path / "one.jsonl", [other]))
    assert [r["responses"] for r in parse("preference", path)] == [expected["responses"]] * 2
    caplog.clear()
    builders.prepare("preference", path, cache_dir=str(tmp_path / "cache"), eval_fraction=0.0)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"{path}: skipped 2 rows with identical chosen and rejected responses (no preference)"]


def test_messages_are_checked_by_chat_check_messages(tmp_path, monkeypatch):
    checked = []
    monkeypatch.setattr(chat, "check_messages", checked.append)
    parse("sft", write_jsonl(tmp_path / "sft.jsonl", [{"messages": [user("a"), bot("b")]}]))
    assert checked == [[user("a"), bot("b")]]


@pytest.mark.parametrize("kind,rows,message", [
    ("sft", [{"question": "q", "answer": "a"}],
     r"bad\.jsonl:1: unrecognised sft row with keys \['answer', 'question'\]; accepted: messages: .*; "
     r"sharegpt: .*; alpaca: .*; prompt_response: \{prompt, response, system\?\}; rename columns with "
     r"data\.field_map"),
    ("preference", [{"prompt": "p", "chosen": "a"}],
     r"bad\.jsonl:1: unrecognised preference row .*nearest: 'pairwise', missing key 'rejected'.*hh: "),
    ("sft", [{"prompt": "p", "response": "r"}, {"instruction": "i", "output": "o"}],
     r"bad\.jsonl:2: row does not match the 'prompt_response' schema detected from row 1 "
     r"\(missing keys 'prompt', 'response'\)"),
    ("preference", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, {"prompt": "p", "chosen": "a", "rejected": "b"}],
     r"bad\.jsonl:2: row does not match the 'hh' schema detected from row 1 \(it has a 'prompt' key\)"),
    ("sft", [{"messages": [user("a"), bot("b")]}, {"messages": [user("a"), {"role": "bot", "content": "b"}]}],
     r"bad\.jsonl:2: 'messages' message 1: role 'bot'"),
    ("sft", [{"messages": [user("a"), sys_("s"), bot("b")]}], r"bad\.jsonl:1: .*a system message may only come first"),
    ("sft", [{"messages": [sys_("s"), user("a"), bot("b")], "system": "t"}],
     r"bad\.jsonl:1: 'messages' has both a top-level 'system' and a first system message"),
    ("sft", [{"messages": "a", "system": "t"}], r"bad\.jsonl:1: 'messages' must be a list of messages, got str"),
    ("sft", [{"messages": [user("a"), 3]}], r"bad\.jsonl:1: 'messages' message 1: expected an object, got int"),
    ("sft", [{"messages": [user("a"), bot(" ")]}], r"bad\.jsonl:1: 'messages' holds no non-empty assistant"),
    ("sft", [{"instruction": "i", "output": "o"}, {"instruction": "i", "output": ""}],
     r"bad\.jsonl:2: 'output' is empty"),
    ("sft", [{"conversations": [{"from": "bing", "value": "a"}]}], r"bad\.jsonl:1: .*'from' 'bing' is not one of"),
    ("preference", [{"chosen": "Human: a", "rejected": "Human: b"}], r"bad\.jsonl:1: no '\\n\\nAssistant:' marker"),
    ("preference", [{"chosen": [user("p"), bot("a"), user("q"), bot("b")], "rejected": [user("p"), bot("c")]}],
     r"bad\.jsonl:1: after the common prompt, 'chosen' must hold exactly one assistant message, got roles "
     r"\['assistant', 'user', 'assistant'\]"),
    ("preference", [{"chosen": [user("p"), bot("a")], "rejected": [user("q"), bot("a")]}],
     r"bad\.jsonl:1: the common prefix .* must end with a user message, got roles \[\]"),
    ("preference", [{"prompt": "p", "chosen": [bot("a"), bot("c")], "rejected": [bot("b")]}],
     r"bad\.jsonl:1: the common prefix .* must end with a user message"),
    ("preference", [{"prompt": [user("p"), bot("q")], "chosen": "a", "rejected": "b"}],
     r"bad\.jsonl:1: 'prompt' must end with a user message"),
])
def test_malformed_rows_name_file_and_row(tmp_path, kind, rows, message):
    with pytest.raises(ValueError, match=message):
        parse(kind, write_jsonl(tmp_path / "bad.jsonl", rows))


def test_dataset_dict_directory_names_its_splits(tmp_path):
    ds = datasets.Dataset.from_list([{"prompt": "p", "response": "r"}])
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"DatasetDict with splits \['train', 'test'\]; point data\.path at one of "
                                         r"them, e\.g\. .*dd/train"):
        builders.prepare("sft", str(tmp_path / "dd"), cache_dir=str(tmp_path / "cache"))
    assert list(builders.prompt_rows(str(tmp_path / "dd" / "test"))) == [("test:1", [user("p")])]


@pytest.mark.parametrize("text,message", [
    ('[{"prompt": "a", "response": "b"},\n {"prompt": "c", "response": }]', r"bad\.json:2: invalid JSON"),
    ('[{"prompt": "a", "response": "b"} {"prompt": "c", "response": "d"}]', r"bad\.json:1: expected ',' or ']'"),
    ('[{"prompt": "a", "response": "b"}, 3]', r"bad\.json:2: expected a JSON object, got int"),
    ('[{"prompt": "a", "response": "b"}', r"bad\.json:1: expected ',' or ']' after this row, got 'the end'"),
    ('[{"prompt": "a", "response": "b"}] x', r"bad\.json: unexpected text after the JSON list"),
    ('"just a string"', r"bad\.json:1: a \.json file must hold a JSON list"),
    ('{\n "prompt": "a",\n "response": "b"\n}', r"bad\.json:1: invalid JSON .*; this \.json file starts with "
     r"'\{', so it is read as JSON Lines \(one object per line\); a JSON file must otherwise be a list of rows"),
])
def test_malformed_json_list_names_the_row(tmp_path, text, message):
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        parse("sft", tmp_path / "bad.json")


def test_json_list_streams_across_small_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(builders, "_READ_CHUNK", 7)
    rows = [{"prompt": f"prompt {i} " + "é" * i, "response": "long " * (i * 5) + "end", "n": [i, {"k": None}]}
            for i in range(40)]
    (tmp_path / "list.json").write_text("\ufeff \n" + json.dumps(rows, indent=2, ensure_ascii=False) + "\n",
                                        encoding="utf-8")
    assert list(builders.read_rows(str(tmp_path / "list.json"))) == list(enumerate(rows, 1))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows))  # JSON Lines named .json
    assert list(builders.read_rows(str(tmp_path / "lines.json"))) == list(enumerate(rows, 1))
    (tmp_path / "empty.json").write_text(" [ ] ")
    assert list(builders.read_rows(str(tmp_path / "empty.json"))) == []
    # Escapes, surrogate pairs, literals and numbers cut at every place still decode.
    rows = [{"s": "é😀\"\\\t" * i, "x": [True, False, None, -1.5e-3 * i, 12345678901234567890 + i]}
            for i in range(9)]
    (tmp_path / "ascii.json").write_text(json.dumps(rows, separators=(",", ":")))
    for chunk in (1, 2, 3, 5):
        monkeypatch.setattr(builders, "_READ_CHUNK", chunk)
        assert list(builders.read_rows(str(tmp_path / "ascii.json"))) == list(enumerate(rows, 1))


class _CountingReader:
    """A text file that counts the characters read from it."""

    def __init__(self, f):
        self.f, self.chars = f, 0

    def read(self, size=-1):
        text = self.f.read(size)
        self.chars += len(text)
        return text

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("head,message", [
    ('[{"prompt": "a", "response": }, ', r"bad\.json:1: invalid JSON \(Expecting value\)"),
    ('[{"prompt": "a", "response": "b"}, {"prompt": "a', r"bad\.json:2: invalid JSON \(Unterminated string.*; "
                                                          r"no complete element within 1000 characters\)"),
])
def test_malformed_json_list_is_not_read_whole(tmp_path, monkeypatch, head, message):
    monkeypatch.setattr(builders, "_READ_CHUNK", 64)
    monkeypatch.setattr(builders, "_MAX_ROW_CHARS", 1000)
    readers, real_open = [], builders._open
    monkeypatch.setattr(builders, "_open", lambda *a, **kw: readers.append(_CountingReader(real_open(*a, **kw)))
                        or readers[-1])
    (tmp_path / "bad.json").write_text(head + "long text without a quote " * 10_000)
    with pytest.raises(ValueError, match=message):
        list(builders.read_rows(str(tmp_path / "bad.json")))
    assert readers[0].chars < 5000
    monkeypatch.setattr(builders, "_open", real_open)  # a row longer than a chunk, shorter than the bound: fine
    (tmp_path / "long.json").write_text(json.dumps([{"prompt": "p" * 900, "response": "r"}]))
    assert len(list(builders.read_rows(str(tmp_path / "long.json")))) == 1


def test_gzip_row_files(tmp_path):
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(3)]
    with gzip.open(tmp_path / "rows.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(tmp_path / "rows.json.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps(rows, indent=1))
    for name in ("rows.jsonl.gz", "rows.json.gz"):
        assert list(builders.read_rows(str(tmp_path / name))) == list(enumerate(rows, 1))
    assert [source for source, _ in builders.prompt_rows(str(tmp_path))] == [
        f"rows.{ext}.gz:{n}" for ext in ("json", "jsonl") for n in (1, 2, 3)]
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(b'{"prompt": "p"}\n' * 100)[:-30])
    with pytest.raises(ValueError, match=r"bad\.jsonl\.gz:\d+: corrupt gzip data"):
        list(builders.read_rows(str(tmp_path / "bad.jsonl.gz")))


def test_field_map_renames_columns_and_keys_the_cache(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(6)])
    cache = str(tmp_path / "cache")
    with pytest.raises(ValueError, match=r"qa\.jsonl:1: unrecognised sft row"):
        builders.prepare("sft", path, cache_dir=cache)
    records = all_records("sft", path, cache, field_map="question=prompt,answer=response")
    assert json.loads(records[3]["messages"]) == [user("q2"), bot("a2")]
    first = builders.prepare("sft", path, cache_dir=cache, field_map="question=prompt, answer=response").data_dir
    same = builders.prepare("sft", path, cache_dir=cache, field_map={"answer": "response", "question": "prompt"})
    assert same.data_dir == first
    other = builders.prepare("sft", path, cache_dir=cache, field_map="question=prompt,answer=response,x=system")
    assert other.data_dir != first


@pytest.mark.parametrize("spec", ["question", "=prompt", "q=prompt,", "a=prompt,b=prompt", "a=x,a=y", 3])
def test_malformed_field_map(spec):
    with pytest.raises(ValueError, match="field_map"):
        schemas.parse_field_map(spec)
    assert schemas.parse_field_map("") == {} and schemas.parse_field_map(None) == {}


def test_text_column_of_a_parquet_file(tmp_path):
    datasets.Dataset.from_list([{"text": "first doc"}, {"text": ""}, {"text": "third doc"}]).to_parquet(
        str(tmp_path / "t.parquet"))
    records = all_records("text", tmp_path / "t.parquet", tmp_path / "cache")
    assert {n: r["text"].decode() for n, r in records.items()} == {1: "first doc", 3: "third doc"}


def test_unsupported_files_and_field_map_typos_are_named(tmp_path):
    csv = tmp_path / "sft.csv"
    csv.write_text("prompt,response\nhi,hello\n")
    with pytest.raises(ValueError, match=r"sft.csv: unsupported file type; data files are .jsonl"):
        list(builders.read_rows(str(csv)))
    rows = tmp_path / "qa.jsonl"
    rows.write_text(json.dumps({"question": "hi", "answer": "hello"}) + "\n")
    with pytest.raises(ValueError, match=r"qa.jsonl:1: unrecognised sft row .*data.field_map renames \['questoin'\], "
                                         r"which the row does not have"):
        builders.prepare("sft", str(rows), cache_dir=str(tmp_path / "c"), field_map="questoin=prompt,answer=response")
