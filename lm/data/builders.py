"""tensorflow-datasets builders for local data, written as array_record (no TensorFlow needed).

`path` is a file or a directory. Formats, per file:
- `.txt` (kind "text" only): a document is a run of lines up to a blank line.
- `.jsonl`: one JSON object per line (blank lines skipped); a `.json` file whose first non-space character
  is `{` is read as JSON Lines too. Row number = line number.
- `.json`: a JSON list of objects, streamed element by element. Row number = 1-based index in the list.
- `.jsonl.gz`, `.json.gz`: the same, gzip-compressed (as Anthropic/hh-rlhf ships), decompressed as read.
- `.parquet`: read batch by batch. Row number = 1-based index.
- a directory written by `datasets.Dataset.save_to_disk` (`state.json` + Arrow stream files): read batch by
  batch, row number = 1-based index. A `DatasetDict` directory is an error: point `path` at one split.
- any other directory: every file under it (recursively, sorted) with the kind's extensions (`.txt` for
  "text", else `.jsonl`, `.json`, their `.gz`, `.parquet`), and every `save_to_disk` directory under it.
Kind "text" also reads a string column "text" from a single non-`.txt` file or dataset directory.

Each file's rows follow one schema, detected from its first row (`lm.data.schemas` has the table):
"sft" rows are prompt_response, alpaca, messages or sharegpt; "preference" rows ranked, pairwise,
pairwise_messages (UltraFeedback) or hh (Anthropic-HH transcripts); "classify" rows {text, label} or
{text, text_pair, label}; RL prompt files (`prompt_rows`) take
the prompt part of any of these. `field_map` ({name in the file: our name}, or "question=prompt,..."
as a string) renames columns first. Records: text `{text}`; sft `{messages}` (a JSON message list);
preference `{prompt (a JSON message list ending with a user message), responses, ranks}` (rank 0 best);
classify `{text, text_pair, label (as JSON)}`.
A malformed row raises a `ValueError` naming `file:row`. Every record keeps its `source` ("file:row",
relative to `path`) for later errors.

Each example goes to the "train" or "eval" split by a hash of its content, `eval_fraction` of them to
"eval" (duplicates share a split, and adding rows never moves old ones); a data set of two or more
examples where no hash falls under that fraction holds out the example(s) with the lowest hash instead.
`prepare` writes the splits once into `<cache_dir>/<kind>-<fingerprint of the input files and field_map>/`
and reuses them while the files are unchanged; `cache_dir` defaults to `$LM_DATA_CACHE` or
`~/.cache/chatgpt-jax/tfds`. A file lock makes concurrent processes on one machine prepare it once.
"""
from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import re
import zlib
from typing import Iterator, Mapping, Optional, Union

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from lm.data import schemas

KINDS = ("text", "sft", "preference", "classify")
SPLITS = ("train", "eval")
ROW_EXTENSIONS = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")
_READ_CHUNK = 1 << 20  # characters of a `.json` list read at a time
_MAX_ROW_CHARS = 1 << 26  # a `.json` list element not complete within this many characters is an error
# How far before the end of the buffer a decoding error may be caused by the buffer's end (a cut literal,
# "\uXXXX" escape or number); an unterminated string is reported where it starts, so it is handled apart.
_CUT_MARGIN = 16
_BATCH_ROWS = 1024  # Parquet rows converted to Python at a time
_SPACE = re.compile(r"\s*")

FieldMap = Union[None, str, Mapping[str, str]]


def _dataset_files(directory: str) -> Optional[list[str]]:
    """The Arrow files of a `Dataset.save_to_disk` directory (None if it is not one); a `DatasetDict` raises."""
    if os.path.isfile(os.path.join(directory, "dataset_dict.json")):
        with open(os.path.join(directory, "dataset_dict.json")) as f:
            splits = json.load(f).get("splits", [])
        raise ValueError(f"{directory} is a datasets DatasetDict with splits {splits}; point data.path at one of "
                         f"them, e.g. {os.path.join(directory, splits[0] if splits else 'train')}")
    state = os.path.join(directory, "state.json")
    if not os.path.isfile(state):
        return None
    with open(state) as f:
        return [os.path.join(directory, d["filename"]) for d in json.load(f)["_data_files"]]


def _files(path: str, kind: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{kind} data path {path} does not exist")
    if _dataset_files(path) is not None:
        return [path]
    exts = (".txt",) if kind == "text" else ROW_EXTENSIONS
    files = []
    for d, subdirs, fs in os.walk(path):
        for sub in list(subdirs):
            if _dataset_files(os.path.join(d, sub)) is not None:
                files.append(os.path.join(d, sub))
                subdirs.remove(sub)  # its metadata `.json` files are no data
        files += [os.path.join(d, f) for f in fs if f.endswith(exts)]
    if not files:
        others = f" (nor {', '.join(exts[1:])} files or save_to_disk directories)" if len(exts) > 1 else ""
        raise FileNotFoundError(f"no {exts[0]} files under {path}{others}")
    return sorted(files)


def _root(path: str) -> str:
    """Sources are named relative to this: the directory given, else the file's (or dataset's) parent."""
    path = os.path.normpath(path)
    return path if os.path.isdir(path) and _dataset_files(path) is None else os.path.dirname(path)


def _open(file: str, mode: str, **kwargs):
    """`open`, or `gzip.open` (streamed; text mode unless `mode` has "b") for a `.gz` file."""
    if file.endswith(".gz"):
        return gzip.open(file, mode if "b" in mode else mode + "t", **kwargs)
    return open(file, mode, **kwargs)


_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)  # a corrupt or truncated `.gz` file


def _lines(file: str) -> Iterator[tuple[int, str]]:
    number = 0
    try:
        with _open(file, "rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{file}:{number}: not valid UTF-8 ({e})") from e
                yield number, line.lstrip("\ufeff") if number == 1 else line  # a byte-order mark is not text
    except _GZIP_ERRORS as e:
        raise ValueError(f"{file}:{number + 1}: corrupt gzip data ({e})") from e


def _text_rows(file: str) -> Iterator[tuple[int, dict]]:
    doc, first = [], 0
    for number, line in _lines(file):
        if line.strip():
            first = first or number
            doc.append(line)
        elif doc:
            yield first, {"text": "\n".join(doc)}
            doc, first = [], 0
    if doc:
        yield first, {"text": "\n".join(doc)}


def _object(file: str, number: int, row) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{file}:{number}: expected a JSON object, got {type(row).__name__}")
    return row


def _jsonl_rows(file: str, hint: str = "") -> Iterator[tuple[int, dict]]:
    for number, line in _lines(file):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{number}: invalid JSON ({e.msg} at column {e.colno}){hint}") from e
        yield number, _object(file, number, row)


def _json_list_rows(file: str) -> Iterator[tuple[int, dict]]:
    """Elements of a JSON list, decoded one at a time from a buffer refilled in `_READ_CHUNK` pieces."""
    decoder = json.JSONDecoder()
    with _open(file, "r", encoding="utf-8-sig") as f:
        buf, pos, number, eof = "", 0, 0, False

        def more(size: int) -> bool:  # appends to the unread part of buf; False at the end of the file
            nonlocal buf, pos, eof
            try:
                chunk = f.read(size)
            except UnicodeDecodeError as e:
                raise ValueError(f"{file}:{number + 1}: not valid UTF-8 ({e})") from e
            except _GZIP_ERRORS as e:
                raise ValueError(f"{file}:{number + 1}: corrupt gzip data ({e})") from e
            buf, pos, eof = buf[pos:] + chunk, 0, not chunk
            return bool(chunk)

        def next_char() -> str:  # the next non-space character, not consumed ("" at the end of the file)
            nonlocal pos
            while True:
                pos = _SPACE.match(buf, pos).end()
                if pos < len(buf) or not more(_READ_CHUNK):
                    return buf[pos:pos + 1]

        if next_char() == "{":  # some data sets name JSON Lines `.json`
            yield from _jsonl_rows(file, hint="; this .json file starts with '{', so it is read as JSON Lines "
                                   "(one object per line); a JSON file must otherwise be a list of rows")
            return
        if next_char() != "[":
            raise ValueError(f"{file}:1: a .json file must hold a JSON list of objects (or JSON Lines)")
        pos += 1
        if next_char() == "]":
            pos += 1
        else:
            while True:
                number += 1
                next_char()
                while True:
                    try:
                        row, pos = decoder.raw_decode(buf, pos)
                        break
                    except json.JSONDecodeError as e:
                        # An error away from the buffer's end is final; else the element may run past the
                        # buffer: read on (doubling keeps this linear), up to `_MAX_ROW_CHARS`.
                        cut = e.pos >= len(buf) - _CUT_MARGIN or e.msg.startswith("Unterminated string")
                        unread = len(buf) - pos
                        too_long = unread > _MAX_ROW_CHARS
                        if not cut or too_long or eof or not more(max(_READ_CHUNK, unread)):
                            why = f"; no complete element within {_MAX_ROW_CHARS} characters" * too_long
                            raise ValueError(f"{file}:{number}: invalid JSON ({e.msg}{why})") from e
                yield number, _object(file, number, row)
                sep = next_char()
                pos += 1
                if sep == "]":
                    break
                if sep != ",":
                    raise ValueError(f"{file}:{number}: expected ',' or ']' after this row, got {sep or 'the end'!r}")
        if next_char():
            raise ValueError(f"{file}: unexpected text after the JSON list")


def _parquet_rows(file: str) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq  # pyarrow loads only when such a file is read

    number = 0
    for batch in pq.ParquetFile(file).iter_batches(batch_size=_BATCH_ROWS):
        for row in batch.to_pylist():
            number += 1
            yield number, row


def _dataset_rows(directory: str) -> Iterator[tuple[int, dict]]:
    import pyarrow as pa

    number = 0
    for file in _dataset_files(directory):
        with pa.memory_map(file) as source:
            for batch in pa.ipc.open_stream(source):
                for start in range(0, batch.num_rows, _BATCH_ROWS):
                    for row in batch.slice(start, _BATCH_ROWS).to_pylist():
                        number += 1
                        yield number, row


def read_rows(file: str) -> Iterator[tuple[int, dict]]:
    """`(row number, raw row)` of one file of any format (see the module docstring), streamed; a `.txt`
    file gives `{"text": document}` rows. A malformed file raises a ValueError naming `file:row`."""
    if os.path.isdir(file):
        return _dataset_rows(file)
    name = file[:-len(".gz")] if file.endswith(".gz") else file  # `_open` decompresses
    if name.endswith(".txt"):
        return _text_rows(file)
    if file.endswith(".parquet"):
        return _parquet_rows(file)
    if name.endswith(".json"):
        return _json_list_rows(file)
    if not name.endswith(".jsonl"):
        raise ValueError(f"{file}: unsupported file type; data files are .jsonl, .json (a list of rows), .parquet, "
                         ".txt (pretraining), optionally gzip-compressed (.gz), or a datasets.save_to_disk directory")
    return _jsonl_rows(file)


def prompt_rows(path: str, field_map: FieldMap = None) -> Iterator[tuple[str, list[dict]]]:
    """`(source "file:row", messages ending with a user message)` of every row of every file under `path`,
    streamed: prompt files (`{"prompt": str | messages}`) or the prompts of any SFT or preference file."""
    fields, root = schemas.parse_field_map(field_map), _root(path)
    for file in _files(path, "prompt"):
        for number, record in schemas.records("prompt", file, read_rows(file), fields):
            yield f"{os.path.relpath(file, root)}:{number}", record["prompt"]


_FEATURES = {
    "text": lambda: {"text": tfds.features.Text()},
    "sft": lambda: {"messages": tfds.features.Text()},
    "preference": lambda: {"prompt": tfds.features.Text(),
                           "responses": tfds.features.Sequence(tfds.features.Text()),
                           "ranks": tfds.features.Sequence(np.int32)},
    "classify": lambda: {"text": tfds.features.Text(), "text_pair": tfds.features.Text(),
                         "label": tfds.features.Text()},
}


_BUCKETS = 1_000_000


def bucket_of(example: dict) -> int:
    """A stable hash of an example's content in `[0, 1e6)`: examples below `eval_fraction * 1e6` are "eval"."""
    content = json.dumps({k: np.asarray(v).tolist() for k, v in sorted(example.items())}, ensure_ascii=False)
    return int.from_bytes(hashlib.sha256(content.encode("utf-8")).digest()[:8], "big") % _BUCKETS


class LocalData(tfds.core.GeneratorBasedBuilder):
    """Builder over local files of one kind (see the module docstring); splits "train" and "eval"."""

    VERSION = tfds.core.Version("2.0.0")
    # No download checksums to look up next to the code (tfds's lookup of them needs `importlib_resources`).
    code_path = None

    def __init__(self, kind: str, path: str, *, eval_fraction: float, data_dir: str, field_map: FieldMap = None):
        if kind not in KINDS:
            raise ValueError(f"data kind {kind!r} is not one of {KINDS}")
        if not 0.0 <= eval_fraction < 1.0:
            raise ValueError(f"eval_fraction={eval_fraction} must be in [0, 1)")
        self._kind, self._path, self._eval_fraction = kind, path, eval_fraction
        self._input_files, self._field_map = _files(path, kind), schemas.parse_field_map(field_map)
        super().__init__(data_dir=data_dir, file_format="array_record")

    # tfds prints "Downloading and preparing..." to stdout; local data is only converted, so log that.
    def _log_download_bytes(self):
        logging.info("converting %s data %s into %s", self._kind, self._path, self.data_dir)

    def _log_download_done(self):
        logging.info("%s data %s ready in %s", self._kind, self._path, self.data_dir)

    def _info(self) -> tfds.core.DatasetInfo:
        features = dict(_FEATURES[self._kind](), source=tfds.features.Text())
        return tfds.core.DatasetInfo(builder=self, description=f"{self._kind} data from {self._path}",
                                     features=tfds.features.FeaturesDict(features))

    def _rows(self, warn_skipped: bool = False) -> Iterator[tuple[str, int, dict]]:
        root = _root(self._path)
        for file in self._input_files:
            for number, example in schemas.records(self._kind, file, read_rows(file), self._field_map,
                                                   warn_skipped=warn_skipped):
                yield f"{os.path.relpath(file, root)}:{number}", bucket_of(example), example

    def _split_generators(self, dl_manager):
        buckets = [b for _, b, _ in self._rows(warn_skipped=True)]  # the first of three passes warns
        if not buckets:
            raise ValueError(f"{self._path} holds no {self._kind} examples")
        threshold = int(self._eval_fraction * _BUCKETS)
        # Small data sets still get a held-out example: the one(s) with the lowest hash.
        if self._eval_fraction > 0 and min(buckets) >= threshold and max(buckets) > min(buckets):
            threshold = min(buckets) + 1
        counts = {"eval": sum(b < threshold for b in buckets)}
        counts["train"] = len(buckets) - counts["eval"]
        # tfds cannot write an empty split, so only the splits that receive examples are declared.
        return {split: self._generate_examples(split, threshold) for split in SPLITS if counts[split]}

    def _generate_examples(self, split: str, threshold: int):
        for source, bucket, example in self._rows():
            if (bucket < threshold) == (split == "eval"):
                yield source, dict(example, source=source)


def _fingerprint(kind: str, files: list[str], eval_fraction: float, field_map: dict[str, str]) -> str:
    h = hashlib.sha256(f"{kind}|{LocalData.VERSION}|{eval_fraction}|{sorted(field_map.items())}".encode())
    for f in files:
        parts = [os.path.join(f, "state.json")] + _dataset_files(f) if os.path.isdir(f) else [f]
        for part in parts:
            st = os.stat(part)
            h.update(f"|{os.path.abspath(part)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def default_cache_dir() -> str:
    """`$LM_DATA_CACHE`, else `~/.cache/chatgpt-jax/tfds`."""
    return os.environ.get("LM_DATA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "chatgpt-jax",
                                                            "tfds")


@contextlib.contextmanager
def _locked(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare(kind: str, path: str, *, cache_dir: Optional[str] = None, eval_fraction: float = 0.05,
            field_map: FieldMap = None) -> LocalData:
    """Prepares (once) and returns the builder of `path` read as `kind` (one of `KINDS`), its
    columns renamed by `field_map` ({name in the file: our name} or "name_in_file=our_name,...")."""
    files, fields = _files(path, kind), schemas.parse_field_map(field_map)
    fingerprint = _fingerprint(kind, files, eval_fraction, fields)
    data_dir = os.path.join(cache_dir or default_cache_dir(), f"{kind}-{fingerprint}")
    with _locked(data_dir + ".lock"):
        builder = LocalData(kind, path, eval_fraction=eval_fraction, data_dir=data_dir, field_map=fields)
        tfds.display_progress_bar(False)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder


def data_source(kind: str, path: str, split: str = "train", *, cache_dir: Optional[str] = None,
                eval_fraction: float = 0.05, field_map: FieldMap = None):
    """Random-access source of one split (see `prepare`): `len(src)`, `src[i]` -> dict of bytes/arrays (the
    record of the module docstring, plus `source`)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    builder = prepare(kind, path, cache_dir=cache_dir, eval_fraction=eval_fraction, field_map=field_map)
    sources = builder.as_data_source()
    if split not in sources:
        raise ValueError(f"{path} has no {split!r} examples (eval_fraction={eval_fraction}); "
                         "add data or change eval_fraction")
    return sources[split]
