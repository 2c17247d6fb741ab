"""tensorflow-datasets builders for local data, written as array_record (no TensorFlow needed).

Three kinds of input:
- "text": a `.txt` file or a directory of them (recursively); a document is a run of lines up to a blank
  line (a file without blank lines is one document).
- "sft": JSONL, one `{"prompt": str, "response": str}` per line (optional `"system": str`).
- "preference": JSONL, one `{"prompt": str, "responses": [str, ...], "ranks": [int, ...]}` per line (rank 0
  is best, ties allowed, at least two distinct ranks), or `{"prompt", "chosen", "rejected"}` (K = 2).
Blank lines of a JSONL file are skipped; other keys are ignored. Any other malformed row raises a
`ValueError` naming the file and line. Every record keeps its `source` ("file:line") for later errors.

Each example goes to the "train" or "eval" split by a hash of its content, `eval_fraction` of them to
"eval" (duplicates share a split, and adding rows never moves old ones); a data set of two or more
examples where no hash falls under that fraction holds out the example(s) with the lowest hash instead.
`prepare` writes the splits once into `<cache_dir>/<kind>-<fingerprint of the input files>/` and reuses
them while the files are unchanged; `cache_dir` defaults to `$LM_DATA_CACHE` or
`~/.cache/chatgpt-jax/tfds`. A file lock makes concurrent processes on one machine prepare it once.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from typing import Iterator, Optional

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

KINDS = ("text", "sft", "preference")
SPLITS = ("train", "eval")


def _files(path: str, kind: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{kind} data path {path} does not exist")
    ext = ".txt" if kind == "text" else ".jsonl"
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(ext))
    if not files:
        raise FileNotFoundError(f"no {ext} files under {path}")
    return files


def _lines(file: str) -> Iterator[tuple[int, str]]:
    with open(file, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise ValueError(f"{file}:{number}: not valid UTF-8 ({e})") from e
            yield number, line.lstrip("\ufeff") if number == 1 else line  # a byte-order mark is not text


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


def json_rows(file: str, parse) -> Iterator[tuple[int, dict]]:
    """`(line number, parse(row))` of each JSONL row; any problem raises a ValueError naming `file:line`."""
    for number, line in _lines(file):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{number}: invalid JSON ({e.msg} at column {e.colno})") from e
        try:
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            yield number, parse(row)
        except ValueError as e:
            raise ValueError(f"{file}:{number}: {e}") from e


def _string(row: dict, key: str, optional: bool = False) -> str:
    if key not in row:
        if optional:
            return ""
        raise ValueError(f"missing key {key!r} (keys: {sorted(row)})")
    if not isinstance(row[key], str):
        raise ValueError(f"{key!r} must be a string, got {type(row[key]).__name__}")
    return row[key]


def parse_prompt(row: dict) -> dict:
    """Validates one prompt row (RL prompts); returns `{prompt}`."""
    return {"prompt": _string(row, "prompt")}


def parse_sft(row: dict) -> dict:
    """Validates one SFT row; returns `{prompt, response, system}`."""
    response = _string(row, "response")
    if not response.strip():
        raise ValueError("'response' is empty")
    return {"prompt": _string(row, "prompt"), "response": response, "system": _string(row, "system", True)}


def parse_preference(row: dict) -> dict:
    """Validates one preference row; returns `{prompt, responses, ranks}` (pairs become ranks [0, 1])."""
    prompt = _string(row, "prompt")
    pairwise = "chosen" in row or "rejected" in row
    if pairwise and ("responses" in row or "ranks" in row):
        raise ValueError("use either 'chosen'/'rejected' or 'responses'/'ranks', not both")
    if pairwise:
        return {"prompt": prompt, "responses": [_string(row, "chosen"), _string(row, "rejected")],
                "ranks": np.asarray([0, 1], np.int32)}
    if "responses" not in row or "ranks" not in row:
        raise ValueError(f"need 'responses' and 'ranks' (or 'chosen' and 'rejected'), got keys {sorted(row)}")
    responses, ranks = row["responses"], row["ranks"]
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise ValueError("'responses' must be a list of strings")
    if not isinstance(ranks, list) or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0
                                              for r in ranks):
        raise ValueError("'ranks' must be a list of non-negative integers (0 = best)")
    if len(responses) != len(ranks):
        raise ValueError(f"{len(responses)} responses but {len(ranks)} ranks")
    if len(set(ranks)) < 2:
        raise ValueError(f"ranks {ranks} express no preference (need at least two distinct ranks)")
    return {"prompt": prompt, "responses": responses, "ranks": np.asarray(ranks, np.int32)}


_FEATURES = {
    "text": lambda: {"text": tfds.features.Text()},
    "sft": lambda: {"prompt": tfds.features.Text(), "response": tfds.features.Text(),
                    "system": tfds.features.Text()},
    "preference": lambda: {"prompt": tfds.features.Text(),
                           "responses": tfds.features.Sequence(tfds.features.Text()),
                           "ranks": tfds.features.Sequence(np.int32)},
}
_PARSERS = {"text": _text_rows, "sft": lambda f: json_rows(f, parse_sft),
            "preference": lambda f: json_rows(f, parse_preference)}


_BUCKETS = 1_000_000


def bucket_of(example: dict) -> int:
    """A stable hash of an example's content in `[0, 1e6)`: examples below `eval_fraction * 1e6` are "eval"."""
    content = json.dumps({k: np.asarray(v).tolist() for k, v in sorted(example.items())}, ensure_ascii=False)
    return int.from_bytes(hashlib.sha256(content.encode("utf-8")).digest()[:8], "big") % _BUCKETS


class LocalData(tfds.core.GeneratorBasedBuilder):
    """Builder over local files of one kind (see the module docstring); splits "train" and "eval"."""

    VERSION = tfds.core.Version("1.0.0")
    # No download checksums to look up next to the code (tfds's lookup of them needs `importlib_resources`).
    code_path = None

    def __init__(self, kind: str, path: str, *, eval_fraction: float, data_dir: str):
        if kind not in KINDS:
            raise ValueError(f"data kind {kind!r} is not one of {KINDS}")
        if not 0.0 <= eval_fraction < 1.0:
            raise ValueError(f"eval_fraction={eval_fraction} must be in [0, 1)")
        self._kind, self._path, self._eval_fraction = kind, path, eval_fraction
        self._input_files = _files(path, kind)
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

    def _rows(self) -> Iterator[tuple[str, int, dict]]:
        root = self._path if os.path.isdir(self._path) else os.path.dirname(self._path)
        for file in self._input_files:
            for number, example in _PARSERS[self._kind](file):
                yield f"{os.path.relpath(file, root)}:{number}", bucket_of(example), example

    def _split_generators(self, dl_manager):
        buckets = [b for _, b, _ in self._rows()]
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


def _fingerprint(kind: str, files: list[str], eval_fraction: float) -> str:
    h = hashlib.sha256(f"{kind}|{LocalData.VERSION}|{eval_fraction}".encode())
    for f in files:
        st = os.stat(f)
        h.update(f"|{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}".encode())
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


def prepare(kind: str, path: str, *, cache_dir: Optional[str] = None, eval_fraction: float = 0.05) -> LocalData:
    """Prepares (once) and returns the builder of `path` read as `kind` ("text", "sft" or "preference")."""
    files = _files(path, kind)
    data_dir = os.path.join(cache_dir or default_cache_dir(), f"{kind}-{_fingerprint(kind, files, eval_fraction)}")
    with _locked(data_dir + ".lock"):
        builder = LocalData(kind, path, eval_fraction=eval_fraction, data_dir=data_dir)
        tfds.display_progress_bar(False)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder


def data_source(kind: str, path: str, split: str = "train", *, cache_dir: Optional[str] = None,
                eval_fraction: float = 0.05):
    """Random-access source of one split: `len(src)`, `src[i]` -> dict of bytes/arrays (plus `source`)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    builder = prepare(kind, path, cache_dir=cache_dir, eval_fraction=eval_fraction)
    sources = builder.as_data_source()
    if split not in sources:
        raise ValueError(f"{path} has no {split!r} examples (eval_fraction={eval_fraction}); "
                         "add data or change eval_fraction")
    return sources[split]
