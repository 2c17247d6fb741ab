r"""Row schemas of local data: detection, validation and normalisation into the records the builders store.

A file's schema is detected from its first row, after `field_map` renamed its columns; every later row must
have the same one ("ranked" and "pairwise" rows may mix, as the K-wise format always allowed). Null values
count as absent keys (columnar files fill missing keys with nulls); other keys are ignored. A string prompt
stands for one user message; a top-level "system" string becomes a first system message.

| kind       | schema            | row                                                                   |
|------------|-------------------|-----------------------------------------------------------------------|
| sft        | prompt_response   | {prompt, response, system?}                                           |
|            | alpaca            | {instruction, input?, output}; user = instruction + "\n\n" + input    |
|            | messages          | {messages: [{role, content}], system?}                                |
|            | sharegpt          | {conversations: [{from: system/human/gpt, value}]}                    |
| preference | ranked            | {prompt: str or messages, responses, ranks, system?}; rank 0 is best  |
|            | pairwise          | {prompt: str or messages, chosen, rejected, system?}; ranks [0, 1]    |
|            | pairwise_messages | {chosen: messages, rejected: messages}; prompt = common prefix, or    |
|            |                   | {prompt, chosen: [assistant message], rejected: [...], system?} (TRL) |
|            | hh                | {chosen, rejected}: "\n\nHuman: ...\n\nAssistant: ..." transcripts    |
| prompt     | (each above)      | its prompt; messages/sharegpt: up to the last user message            |
|            | prompt            | {prompt: str or messages, system?}                                    |
| text       | text              | {text}; blank texts are skipped                                       |
| classify   | text_pair         | {text, text_pair, label}: a sentence pair (GPT-1's entailment input)  |
|            | text              | {text, label}                                                         |

pairwise_messages (UltraFeedback): the prompt is the longest common prefix of the two lists and each must
continue with exactly one assistant message (UltraFeedback's own "prompt" string is then ignored); TRL's
explicit-prompt rows instead give `prompt` and, as chosen and rejected, one assistant message each. hh
(Anthropic-HH): the prompt is the transcript up to the last "\n\nAssistant:" inside the common prefix of the
two strings; the responses are the rests, stripped. A pair whose two responses are equal expresses no
preference: it is skipped, with one warning per file giving the count.

Records: sft `{"messages": JSON string of [{role, content}]}`; preference `{"prompt": JSON string of
messages ending with a user message, "responses": [str], "ranks": int32 array}`; prompt `{"prompt":
[{role, content}]}`; text `{"text": str}`; classify `{"text": str, "text_pair": str ("" for a single text),
"label": the label as JSON}` (an int or a string; lm.classify maps it to a class id).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
from absl import logging

from lm.data import chat

_SHAREGPT_ROLES = {**{r: r for r in chat.ROLES}, "human": "user", "gpt": "assistant"}
_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_field_map(spec: Union[None, str, Mapping[str, str]]) -> dict[str, str]:
    """`{name in the file: our name}` from a Mapping or a string "question=prompt,answer=response" ("" -> {})."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return {}
    if isinstance(spec, str):
        pairs = []
        for entry in spec.split(","):
            old, sep, new = entry.partition("=")
            if not sep or not old.strip() or not new.strip():
                raise ValueError(f"field_map entry {entry!r} of {spec!r} is not 'name_in_file=our_name'")
            pairs.append((old.strip(), new.strip()))
    elif isinstance(spec, Mapping):
        pairs = list(spec.items())
        if not all(isinstance(k, str) and isinstance(v, str) and k and v for k, v in pairs):
            raise ValueError(f"field_map {spec!r} must map non-empty column names to non-empty names")
    else:
        raise ValueError(f"field_map must be a mapping or a 'name_in_file=our_name,...' string, got {spec!r}")
    for side, names in (("renamed", [k for k, _ in pairs]), ("target", [v for _, v in pairs])):
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"field_map {spec!r}: {side} name(s) {repeated} appear more than once")
    return dict(pairs)


def _string(row: dict, key: str, optional: bool = False) -> str:
    if key not in row:
        if optional:
            return ""
        raise ValueError(f"missing key {key!r} (keys: {sorted(row)})")
    if not isinstance(row[key], str):
        raise ValueError(f"{key!r} must be a string, got {type(row[key]).__name__}")
    return row[key]


def _messages(value, what: str) -> list[dict]:
    """`value` (raw JSON) checked to be a list of message objects valid for `chat.check_messages`, reduced
    to their role and content."""
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a list of messages, got {type(value).__name__}")
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise ValueError(f"{what} message {i}: expected an object, got {type(m).__name__}")
    try:
        chat.check_messages(value)
    except ValueError as e:
        raise ValueError(f"{what} {e}") from e
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _with_system(row: dict, messages, what: str) -> list[dict]:
    """`messages` (raw JSON) validated, after the row's top-level "system" string (if any)."""
    messages = _messages(messages, what)
    system = _string(row, "system", optional=True)
    if not system:
        return messages
    if messages and messages[0]["role"] == "system":
        raise ValueError(f"{what} has both a top-level 'system' and a first system message")
    return [{"role": "system", "content": system}] + messages


def _ends_with_user(messages: list[dict], what: str) -> list[dict]:
    if not messages or messages[-1]["role"] != "user":
        raise ValueError(f"{what} must end with a user message, got roles {[m['role'] for m in messages]}")
    return messages


def _prompt(row: dict) -> list[dict]:
    value = row["prompt"]
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    elif not isinstance(value, list):
        raise ValueError(f"'prompt' must be a string or a list of messages, got {type(value).__name__}")
    return _ends_with_user(_with_system(row, value, "'prompt'"), "'prompt'")


def _up_to_last_user(messages: list[dict], what: str) -> list[dict]:
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise ValueError(f"{what} holds no user message")
    return messages[:users[-1] + 1]


def _sft_record(messages: list[dict], what: str) -> dict:
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise ValueError(f"{what} holds no non-empty assistant message")
    return {"messages": json.dumps(messages, ensure_ascii=False)}


def _alpaca_user(row: dict) -> str:
    extra = _string(row, "input", optional=True)
    return _string(row, "instruction") + ("\n\n" + extra if extra.strip() else "")


def _sharegpt(row: dict) -> list[dict]:
    turns = row["conversations"]
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise ValueError("'conversations' must be a list of {from, value} objects")
    for i, t in enumerate(turns):
        if t.get("from") not in _SHAREGPT_ROLES:
            raise ValueError(f"'conversations' turn {i}: 'from' {t.get('from')!r} is not one of "
                             f"{sorted(_SHAREGPT_ROLES)}")
    return _messages([{"role": _SHAREGPT_ROLES[t["from"]], "content": t.get("value")} for t in turns],
                     "'conversations'")


def _prompt_response(row: dict) -> dict:
    response = _string(row, "response")
    if not response.strip():
        raise ValueError("'response' is empty")
    user = _string(row, "prompt")
    return _sft_record(_with_system(row, [{"role": "user", "content": user},
                                          {"role": "assistant", "content": response}], "row"), "row")


def _alpaca(row: dict) -> dict:
    output = _string(row, "output")
    if not output.strip():
        raise ValueError("'output' is empty")
    return _sft_record([{"role": "user", "content": _alpaca_user(row)},
                        {"role": "assistant", "content": output}], "row")


def _preference_record(prompt: list[dict], responses, ranks) -> dict:
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise ValueError("'responses' must be a list of strings")
    if not isinstance(ranks, list) or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0
                                              for r in ranks):
        raise ValueError("'ranks' must be a list of non-negative integers (0 = best)")
    if len(responses) != len(ranks):
        raise ValueError(f"{len(responses)} responses but {len(ranks)} ranks")
    if len(set(ranks)) < 2:
        raise ValueError(f"ranks {ranks} express no preference (need at least two distinct ranks)")
    return {"prompt": json.dumps(prompt, ensure_ascii=False), "responses": responses,
            "ranks": np.asarray(ranks, np.int32)}


def _not_both(row: dict) -> None:
    if ("chosen" in row or "rejected" in row) and ("responses" in row or "ranks" in row):
        raise ValueError("use either 'chosen'/'rejected' or 'responses'/'ranks', not both")


def _ranked(row: dict) -> dict:
    _not_both(row)
    return _preference_record(_prompt(row), row["responses"], row["ranks"])


def _split_pairwise(row: dict) -> tuple[list[dict], str, str]:
    _not_both(row)
    return _prompt(row), _string(row, "chosen"), _string(row, "rejected")


def _is_reply(messages: list[dict]) -> bool:
    return len(messages) == 1 and messages[0]["role"] == "assistant"


def _split_pairwise_messages(row: dict) -> tuple[list[dict], str, str]:
    chosen, rejected = _messages(row["chosen"], "'chosen'"), _messages(row["rejected"], "'rejected'")
    if "prompt" in row and _is_reply(chosen) and _is_reply(rejected):  # TRL's explicit-prompt format
        return _prompt(row), chosen[0]["content"], rejected[0]["content"]
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if chosen == rejected:  # the same reply twice: the prompt is what comes before it
        n -= 1
    prompt = _ends_with_user(_with_system(row, chosen[:n], "prompt"),
                             "the common prefix of 'chosen' and 'rejected' (the prompt)")
    for key, tail in (("chosen", chosen[n:]), ("rejected", rejected[n:])):
        if len(tail) != 1 or tail[0]["role"] != "assistant":
            raise ValueError(f"after the common prompt, {key!r} must hold exactly one assistant message, "
                             f"got roles {[m['role'] for m in tail]}")
    return prompt, chosen[n]["content"], rejected[n]["content"]


def _split_hh(row: dict) -> tuple[list[dict], str, str]:
    chosen, rejected = _string(row, "chosen"), _string(row, "rejected")
    at = os.path.commonprefix([chosen, rejected]).rfind(_ASSISTANT)
    if at < 0:
        raise ValueError(f"no {_ASSISTANT!r} marker in the common prefix of 'chosen' and 'rejected' (an "
                         "Anthropic-HH transcript)")
    transcript = chosen[:at]
    # Some copies of HH drop the leading blank line of the first turn.
    parts = _HH_TURN.split("\n\n" + transcript if transcript.startswith("Human:") else transcript)
    if parts[0].strip():
        raise ValueError(f"text before the first '\\n\\nHuman:' turn: {parts[0][:40]!r}")
    turns = [{"role": "user" if who == "Human" else "assistant", "content": text.strip()}
             for who, text in zip(parts[1::2], parts[2::2])]
    prompt = _ends_with_user(_with_system(row, turns, "transcript"), "the transcript before the reply")
    end = at + len(_ASSISTANT)
    return prompt, chosen[end:].strip(), rejected[end:].strip()


def _pair_record(split: Callable[[dict], tuple[list[dict], str, str]]) -> Callable[[dict], Optional[dict]]:
    def parse(row: dict) -> Optional[dict]:
        prompt, chosen, rejected = split(row)
        if chosen == rejected:  # no preference (duplicates exist in UltraFeedback and HH): skipped
            return None
        return _preference_record(prompt, [chosen, rejected], [0, 1])
    return parse


def _text(row: dict) -> Optional[dict]:
    text = _string(row, "text")
    return {"text": text} if text.strip() else None


def _classify(row: dict) -> dict:
    """A labelled text (and pair text) with its label as JSON: ids or names are mapped to classes later
    (`label_names`, `label_id`), once every label of the data is known."""
    texts = {key: _string(row, key, optional=key == "text_pair") for key in ("text", "text_pair")}
    for key, text in texts.items():
        if key in row and not text.strip():
            raise ValueError(f"{key!r} is empty")
    label = row["label"]
    if isinstance(label, bool) or not isinstance(label, (int, str)) or not str(label).strip():
        raise ValueError(f"'label' must be an integer class id or a non-empty string name, got {label!r}")
    return dict(texts, label=json.dumps(label, ensure_ascii=False))


def label_names(labelled: Iterable[tuple[str, object]], given: Sequence[str] = ()) -> list[str]:
    """The class names of a run, index = class id, from `(source "file:row", label)` of every labelled row.

    given: the class names in id order (`data.labels`, or a resumed run's own). Without it, string labels are
    numbered in sorted order and integer labels are their own ids (names "0", "1", ... up to the largest).
    A label that is neither is an error naming its row: a string outside `given`, an integer outside
    `[0, len(given))` or negative, or a mix of strings and integers in one data set.
    """
    given = [str(x) for x in given]
    if len(set(given)) != len(given):
        raise ValueError(f"data.labels {given} repeats a name")
    found, first = set(), {}  # labels seen; where the first id / name was
    for source, label in labelled:
        kind = "id" if isinstance(label, int) else "name"
        first.setdefault(kind, source)
        if len(first) > 1:
            other = "name" if kind == "id" else "id"
            raise ValueError(f"{source}: label {label!r} is a class {kind}, but the first class {other} is at "
                             f"{first[other]}: labels are integer ids or string names, not both")
        if kind == "id" or given:
            label_id(label, given or None, source)
        found.add(label)
    if given:
        return given
    if "id" in first:
        return [str(i) for i in range(max(found) + 1)]
    return sorted(found)


def label_id(label, names: Optional[Sequence[str]], source: str) -> int:
    """The class id of a row's `label` (an int id or a string name) among `names` (None: any id >= 0 is
    accepted, the names not known yet); errors name the row's `source`."""
    if isinstance(label, int):
        if label < 0 or (names is not None and label >= len(names)):
            known = f"[0, {len(names)})" if names is not None else "0, 1, ..."
            raise ValueError(f"{source}: label {label} is not a class id in {known}")
        return label
    if label not in names:
        raise ValueError(f"{source}: label {label!r} is not one of the classes {list(names)}")
    return list(names).index(label)


def decode_label(raw) -> object:
    """A classify record's label (kept as JSON) as the int or string the data gave."""
    return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)


def _is_list(key: str) -> Callable[[dict], str]:
    return lambda row: "" if isinstance(row.get(key), list) else f"{key!r} is not a message list"


def _not_list(key: str) -> Callable[[dict], str]:
    return lambda row: f"{key!r} is a message list" if isinstance(row.get(key), list) else ""


def _hh_shape(row: dict) -> str:
    return "it has a 'prompt' key" if "prompt" in row else _not_list("chosen")(row)


@dataclasses.dataclass(frozen=True)
class Schema:
    """One accepted row shape: `parse` turns a matching row into a normalised record (None: skip the row)."""
    name: str
    keys: str  # how such a row looks, for error messages
    required: tuple[str, ...]
    parse: Callable[[dict], Optional[dict]]
    shape: Callable[[dict], str] = lambda row: ""  # "" if the row has this schema's shape, else why not
    skips: str = ""  # which rows `parse` skips, for the warning that counts them ("": none)

    def mismatch(self, row: dict) -> str:
        """An empty string when `row` has this schema's keys and shape, else what is wrong."""
        missing = [k for k in self.required if k not in row]
        if missing:
            return f"missing key{'s' * (len(missing) > 1)} {', '.join(map(repr, missing))}"
        return self.shape(row)

    def distance(self, row: dict) -> int:
        """How far `row` is from this schema (missing keys, plus one for a wrong shape): picks the hint of an
        unrecognised row."""
        return sum(k not in row for k in self.required) + bool(self.shape(row))


_PAIRWISE_MESSAGES = ("{chosen: [messages], rejected: [messages]} or {prompt, chosen: [assistant message], "
                      "rejected: [assistant message], system?}")
_SAME_PAIR = "with identical chosen and rejected responses (no preference)"
SCHEMAS: dict[str, tuple[Schema, ...]] = {
    "sft": (
        Schema("messages", "{messages: [{role, content}], system?}", ("messages",),
               lambda r: _sft_record(_with_system(r, r["messages"], "'messages'"), "'messages'")),
        Schema("sharegpt", "{conversations: [{from, value}]}", ("conversations",),
               lambda r: _sft_record(_sharegpt(r), "'conversations'")),
        Schema("alpaca", "{instruction, input?, output}", ("instruction", "output"), _alpaca),
        Schema("prompt_response", "{prompt, response, system?}", ("prompt", "response"), _prompt_response),
    ),
    "preference": (
        Schema("ranked", "{prompt, responses, ranks, system?}", ("prompt", "responses", "ranks"), _ranked),
        Schema("pairwise_messages", _PAIRWISE_MESSAGES, ("chosen", "rejected"),
               _pair_record(_split_pairwise_messages), _is_list("chosen"), _SAME_PAIR),
        Schema("pairwise", "{prompt, chosen, rejected, system?}", ("prompt", "chosen", "rejected"),
               _pair_record(_split_pairwise), _not_list("chosen"), _SAME_PAIR),
        Schema("hh", "{chosen, rejected} (Human/Assistant transcripts, no prompt)", ("chosen", "rejected"),
               _pair_record(_split_hh), _hh_shape, _SAME_PAIR),
    ),
    "prompt": (
        Schema("messages", "{messages: [{role, content}], system?}", ("messages",),
               lambda r: {"prompt": _up_to_last_user(_with_system(r, r["messages"], "'messages'"), "'messages'")}),
        Schema("pairwise_messages", _PAIRWISE_MESSAGES, ("chosen", "rejected"),
               lambda r: {"prompt": _split_pairwise_messages(r)[0]}, _is_list("chosen")),
        Schema("hh", "{chosen, rejected} (Human/Assistant transcripts, no prompt)", ("chosen", "rejected"),
               lambda r: {"prompt": _split_hh(r)[0]}, _hh_shape),
        Schema("sharegpt", "{conversations: [{from, value}]}", ("conversations",),
               lambda r: {"prompt": _up_to_last_user(_sharegpt(r), "'conversations'")}),
        Schema("alpaca", "{instruction, input?}", ("instruction",),
               lambda r: {"prompt": [{"role": "user", "content": _alpaca_user(r)}]}),
        Schema("prompt", "{prompt, system?}", ("prompt",), lambda r: {"prompt": _prompt(r)}),
    ),
    "text": (Schema("text", "{text}", ("text",), _text, skips="with a blank text"),),
    "classify": (
        Schema("text_pair", "{text, text_pair, label}", ("text", "text_pair", "label"), _classify),
        Schema("text", "{text, label}", ("text", "label"), _classify),
    ),
}
# The K-wise format always allowed pairs among ranked rows.
_MIXABLE = {"ranked": "pairwise", "pairwise": "ranked"}


def _rename(row: dict, field_map: Mapping[str, str]) -> dict:
    out = {k: v for k, v in row.items() if k not in field_map and v is not None}
    out.update({new: row[old] for old, new in field_map.items() if row.get(old) is not None})
    return out


def _detect(kind: str, row: dict) -> Schema:
    schemas = SCHEMAS[kind]
    for schema in schemas:
        if not schema.mismatch(row):
            return schema
    near = min((s for s in schemas if any(k in row for k in s.required)), key=lambda s: s.distance(row),
               default=None)
    hint = f" (nearest: {near.name!r}, {near.mismatch(row)})" if near else ""
    accepted = "; ".join(f"{s.name}: {s.keys}" for s in schemas)
    raise ValueError(f"unrecognised {kind} row with keys {sorted(row)}{hint}; accepted: {accepted}; "
                     "rename columns with data.field_map")


def records(kind: str, file: str, rows: Iterable[tuple[int, dict]], field_map: Mapping[str, str], *,
            warn_skipped: bool = True) -> Iterator[tuple[int, dict]]:
    """`(row number, normalised record)` of one file's raw rows read as `kind` ("sft", "preference",
    "prompt", "text" or "classify"), renamed by `field_map` (from `parse_field_map`); the schema comes from the
    first row.

    Any problem raises a ValueError naming `file:row`. Rows that carry nothing (blank texts, pairs without a
    preference) are skipped, with one warning per file counting them if `warn_skipped`.
    """
    schema, first, skipped = None, 0, collections.Counter()
    for number, raw in rows:
        try:
            row = _rename(raw, field_map)
            if schema is None:
                absent = sorted(k for k in field_map if k not in raw)
                try:
                    schema, first = _detect(kind, row), number
                except ValueError as e:
                    if not absent:
                        raise
                    raise ValueError(f"{e} (data.field_map renames {absent}, which the row does not have)") from None
            parser = schema
            if schema.mismatch(row):
                mixed = next((s for s in SCHEMAS[kind] if s.name == _MIXABLE.get(schema.name)), None)
                if mixed is None or mixed.mismatch(row):
                    raise ValueError(f"row does not match the {schema.name!r} schema detected from row {first} "
                                     f"({schema.mismatch(row)})")
                parser = mixed
            record = parser.parse(row)
        except ValueError as e:
            raise ValueError(f"{file}:{number}: {e}") from e
        if record is None:
            skipped[parser.skips] += 1
        else:
            yield number, record
    if warn_skipped:
        for reason, count in skipped.items():
            logging.warning("%s: skipped %d row%s %s", file, count, "s" * (count > 1), reason)
