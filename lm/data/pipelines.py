"""grain pipelines from prepared tfds sources to training batches (dicts of NumPy arrays).

Every pipeline: reads one split ("train" or the held-out "eval") of `builders.data_source`, keeps this
process's shard (`process_index::process_count`), shuffles with `seed` (differently each epoch), repeats
(`num_epochs=None`: forever), tokenizes, packs and batches. The result is a `grain.IterDataset`; its
iterator's `get_state()` / `set_state()` (a small JSON-able dict) resume it exactly. With a finite
`num_epochs` the last batch is padded with empty rows (loss_mask 0), so no example is left out.

LM batches (`pretrain_dataset`, `sft_dataset`) follow the project convention: `inputs`, `targets` int32
`[B, T]`, `loss_mask` float32 `[B, T]`, `segment_ids` int32 `[B, T]` (0 = padding), `positions` int32
`[B, T]` (`[B, T, 2]` for GLM) and, for GLM, `prefix_len` int32 `[B]`.

Over-long SFT/preference examples (more than `seq_len` tokens after formatting): `overlong="error"` (the
default) raises naming the example's file and line; `overlong="truncate"` keeps the first `seq_len` tokens
(the end of the response, and its eos, are lost), logs a warning with the running count, and still raises
when no response token would survive.
"""
from __future__ import annotations

import itertools
import json
import threading
from typing import Optional

import grain
import numpy as np
from absl import logging

from lm.data import builders, chat, schemas
from lm.data.glm import GlmTokens, blank_infilling

_READ = grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _records(kind, path, split, *, seed, process_index, process_count, num_epochs, cache_dir, eval_fraction,
             field_map=None, even_shards=False):
    """This process's shuffled, repeated records of one split. even_shards: a process with one record fewer
    than others gets an empty one (`{}`), so in a finite pass every process runs the same number of batches."""
    src = builders.data_source(kind, path, split, cache_dir=cache_dir, eval_fraction=eval_fraction,
                               field_map=field_map)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
    ds = grain.MapDataset.source(src)[process_index::process_count]
    if even_shards and len(ds) < -(-len(src) // process_count):
        ds = grain.MapDataset.concatenate([ds, grain.MapDataset.source([{}])])
    if len(ds) == 0:
        raise ValueError(f"{path} split {split!r} has {len(src)} examples: none left for process "
                         f"{process_index} of {process_count}")
    return ds.shuffle(seed).repeat(num_epochs)


def _batch(ds: grain.IterDataset, batch_size: int, finite: bool) -> grain.IterDataset:
    def stack(rows):
        out = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        missing = batch_size - len(rows)
        if missing:  # the last batch of a finite pass: pad with empty rows that carry no loss
            out = {k: np.concatenate([v, np.zeros((missing,) + v.shape[1:], v.dtype)]) for k, v in out.items()}
            for key in ("ranks", "labels"):  # absent responses, unlabelled rows
                if key in out:
                    out[key][-missing:] = -1
        return out
    return ds.batch(batch_size, drop_remainder=not finite, batch_fn=stack)


def _pad(x: np.ndarray, length: int, value=0) -> np.ndarray:
    return np.concatenate([x, np.full((length - len(x),) + x.shape[1:], value, x.dtype)])


def glm_window(seq_len: int, mask_ratio: float = 0.15, poisson_lambda: float = 3.0) -> int:
    """Raw tokens per GLM example: infilling adds 2 tokens per span (about `n * 2 * ratio / lambda`), so
    the window leaves 25% more room than that on average; rare longer draws get fewer spans."""
    return min(seq_len - 2, int(seq_len / (1 + 2.5 * mask_ratio / poisson_lambda)))


class _Infill:
    """GLM transform of one raw window (a grain random map)."""

    def __init__(self, ids: GlmTokens, seq_len: int, **kwargs):
        self.ids, self.seq_len, self.kwargs = ids, seq_len, kwargs

    def __call__(self, x, rng: np.random.Generator) -> dict:
        tokens = x["tokens"][x["tokens_segment_ids"] > 0]
        ex = blank_infilling(tokens, rng, self.ids, max_len=self.seq_len, **self.kwargs)
        t = self.seq_len
        return {"inputs": _pad(ex["inputs"], t), "targets": _pad(ex["targets"], t),
                "loss_mask": _pad(ex["loss_mask"], t), "positions": _pad(ex["positions"], t),
                "segment_ids": _pad(np.ones(len(ex["inputs"]), np.int32), t),
                "prefix_len": np.int32(ex["prefix_len"])}


def pretrain_dataset(path: str, tokenizer, *, seq_len: int, batch_size: int, seed: int,
                     split: str = "train", process_index: int = 0, process_count: int = 1,
                     objective: str = "causal", num_epochs: Optional[int] = None, cache_dir: Optional[str] = None,
                     eval_fraction: float = 0.05, mask_ratio: float = 0.15, poisson_lambda: float = 3.0,
                     gmask_prob: float = 0.5) -> grain.IterDataset:
    """Batches for pretraining on plain text (a `.txt` file or a directory of them).

    Each document becomes `[bos] text [eos]` (no bos for a tokenizer without one); documents are concatenated
    and cut into rows (grain's concat-then-split). "causal": next-token batches where `segment_ids` /
    `positions` restart at every document, so attention never crosses documents. "glm": each row is a window of
    `glm_window(seq_len)` raw tokens turned into one blank-infilling example (`lm.data.glm`), with
    `gmask_prob` of the rows using `[gMASK]`; adds `prefix_len` and 2D `positions`.
    """
    ds = _records("text", path, split, seed=seed, process_index=process_index, process_count=process_count,
                  num_epochs=num_epochs, cache_dir=cache_dir, eval_fraction=eval_fraction)
    if tokenizer.eos_id is None:
        raise ValueError(f"tokenizer {tokenizer.path} has no eos token to end each document with")
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]  # GPT-NeoX's tokenizer has none
    ds = ds.map(lambda r: np.asarray(bos + tokenizer.encode(_text(r["text"])) + [tokenizer.eos_id], np.int32))
    it = ds.to_iter_dataset(_READ)
    if objective == "causal":
        it = it.map(lambda t: {"inputs": t[:-1], "targets": t[1:]})
        it = grain.experimental.ConcatThenSplitIterDataset(it, length_struct={"inputs": seq_len, "targets": seq_len})
        it = it.map(lambda x: {"inputs": x["inputs"], "targets": x["targets"],
                               "loss_mask": (x["inputs_segment_ids"] > 0).astype(np.float32),
                               "segment_ids": x["inputs_segment_ids"].astype(np.int32),
                               "positions": x["inputs_positions"].astype(np.int32)})
    elif objective == "glm":
        window = glm_window(seq_len, mask_ratio, poisson_lambda)
        it = it.map(lambda t: {"tokens": t})
        it = grain.experimental.ConcatThenSplitIterDataset(it, length_struct={"tokens": window})
        it = it.random_map(_Infill(GlmTokens.from_tokenizer(tokenizer), seq_len, mask_ratio=mask_ratio,
                                   poisson_lambda=poisson_lambda, gmask_prob=gmask_prob), seed=seed)
    else:
        raise ValueError(f"objective {objective!r} is not 'causal' or 'glm'")
    return _batch(it, batch_size, num_epochs is not None)


class _Overlong:
    """Applies the over-long rule (see the module docstring) and counts truncations."""

    def __init__(self, mode: str, seq_len: int):
        if mode not in ("error", "truncate"):
            raise ValueError(f"overlong={mode!r} is not 'error' or 'truncate'")
        self.mode, self.seq_len, self.count, self._lock = mode, seq_len, 0, threading.Lock()

    def __call__(self, n: int, source: str) -> int:
        """Returns how many tokens to keep of an `n`-token example."""
        if n <= self.seq_len:
            return n
        if self.mode == "error":
            raise ValueError(f"example {source} has {n} tokens after formatting, more than seq_len={self.seq_len}; "
                             "raise seq_len or pass overlong='truncate'")
        with self._lock:
            self.count += 1
            logging.warning("truncated example %s from %d to %d tokens (%d truncated so far)", source, n,
                            self.seq_len, self.count)
        return self.seq_len


def _sft_example(r, tokenizer, overlong: _Overlong) -> dict:
    source = _text(r["source"])
    try:
        ids, mask = chat.format_chat(tokenizer, json.loads(_text(r["messages"])))
    except ValueError as e:
        raise ValueError(f"example {source}: {e}") from e
    keep = overlong(len(ids) - 1, source)
    ex = {"inputs": ids[:-1][:keep], "targets": ids[1:][:keep], "loss_mask": mask[1:][:keep]}
    if not ex["loss_mask"].any():
        raise ValueError(f"example {source}: the prompt alone fills seq_len={overlong.seq_len}; no response "
                         "token is left to train on")
    return ex


def sft_dataset(path: str, tokenizer, *, seq_len: int, batch_size: int, seed: int, split: str = "train",
                process_index: int = 0, process_count: int = 1, pack: bool = True, num_epochs: Optional[int] = None,
                overlong: str = "error", cache_dir: Optional[str] = None, eval_fraction: float = 0.05,
                num_packing_bins: Optional[int] = None, field_map=None) -> grain.IterDataset:
    """Batches for supervised fine-tuning on SFT rows (any format and schema of `lm.data.builders`, columns
    renamed by `field_map`), formatted by `lm.data.chat` (the tokenizer's chat template).

    The loss covers response tokens and their eos only. With `pack`, several examples share a row
    (grain's first-fit packing over `num_packing_bins`, default `batch_size`, bins); `segment_ids` number
    them and `positions` restart at each, so attention never crosses examples. Without it, one example per
    row, right-padded.
    """
    check = _Overlong(overlong, seq_len)
    ds = _records("sft", path, split, seed=seed, process_index=process_index, process_count=process_count,
                  num_epochs=num_epochs, cache_dir=cache_dir, eval_fraction=eval_fraction, field_map=field_map)
    it = ds.map(lambda r: _sft_example(r, tokenizer, check)).to_iter_dataset(_READ)
    if pack:
        it = grain.experimental.FirstFitPackIterDataset(
            it, length_struct={"inputs": seq_len, "targets": seq_len, "loss_mask": seq_len},
            num_packing_bins=num_packing_bins or batch_size, seed=seed)
        it = it.map(lambda x: {"inputs": x["inputs"], "targets": x["targets"], "loss_mask": x["loss_mask"],
                               "segment_ids": x["inputs_segment_ids"].astype(np.int32),
                               "positions": x["inputs_positions"].astype(np.int32)})
    else:
        it = it.map(lambda x: {"inputs": _pad(x["inputs"], seq_len), "targets": _pad(x["targets"], seq_len),
                               "loss_mask": _pad(x["loss_mask"], seq_len),
                               "segment_ids": _pad(np.ones(len(x["inputs"]), np.int32), seq_len),
                               "positions": _pad(np.arange(len(x["inputs"]), dtype=np.int32), seq_len)})
    return _batch(it, batch_size, num_epochs is not None)


def _preference_example(r, tokenizer, k: int, seq_len: int, overlong: _Overlong) -> dict:
    source = _text(r["source"])
    responses, ranks = [_text(x) for x in r["responses"]], np.asarray(r["ranks"], np.int32)
    if len(responses) > k:
        raise ValueError(f"example {source} has {len(responses)} responses, more than k={k}")
    messages = json.loads(_text(r["prompt"]))
    try:
        prompt = chat.prompt_ids(tokenizer, messages)
        replies = [chat.format_response(tokenizer, x, messages) for x in responses]
    except ValueError as e:
        raise ValueError(f"example {source}: {e}") from e
    order = np.argsort(ranks, kind="stable")  # best first; absent responses go last
    tokens = np.full((k, seq_len), tokenizer.pad_id, np.int32)
    lengths, prompt_len, out_ranks = np.zeros(k, np.int32), np.zeros(k, np.int32), np.full(k, -1, np.int32)
    for slot, i in enumerate(order):
        seq = np.concatenate([prompt, replies[i]])
        keep = overlong(len(seq), source)
        if keep <= len(prompt):
            raise ValueError(f"example {source}: the prompt alone fills seq_len={seq_len}")
        tokens[slot, :keep] = seq[:keep]
        lengths[slot], prompt_len[slot], out_ranks[slot] = keep, len(prompt), ranks[i]
    t = np.arange(seq_len)
    targets = np.concatenate([tokens[:, 1:], np.full((k, 1), tokenizer.pad_id, np.int32)], axis=1)
    loss_mask = ((t >= prompt_len[:, None] - 1) & (t < lengths[:, None] - 1)).astype(np.float32)
    pairs = list(itertools.combinations(range(k), 2))
    chosen, rejected = np.asarray([p[0] for p in pairs], np.int32), np.asarray([p[1] for p in pairs], np.int32)
    # Sorted best first, so i < j is a preference exactly when both exist and rank_i < rank_j (not a tie).
    pair_mask = ((out_ranks[chosen] >= 0) & (out_ranks[rejected] >= 0) & (out_ranks[chosen] < out_ranks[rejected]))
    return {"tokens": tokens, "lengths": lengths, "last_index": np.maximum(lengths - 1, 0), "prompt_len": prompt_len,
            "ranks": out_ranks, "inputs": tokens, "targets": targets, "loss_mask": loss_mask,
            "chosen_index": chosen, "rejected_index": rejected, "pair_mask": pair_mask.astype(np.float32)}


def _classify_example(r, tokenizer, labels: list[str], seq_len: int, overlong: _Overlong) -> dict:
    """GPT-1's input of a labelled row: `[bos] text [eos text_pair] eos`, the label read at the final eos (the
    delimiter is eos too: tokenizers have no separator token in common). An over-long row keeps its first tokens
    and its final eos. The empty record of `even_shards` becomes a row without a label (-1)."""
    if not r:
        return {"inputs": np.full(seq_len, tokenizer.pad_id, np.int32), "targets": np.zeros(seq_len, np.int32),
                "loss_mask": np.zeros(seq_len, np.float32), "last_index": np.int32(0), "labels": np.int32(-1)}
    source = _text(r["source"])
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    ids = bos + tokenizer.encode(_text(r["text"]))
    pair = _text(r["text_pair"])
    if pair:
        ids += [tokenizer.eos_id] + tokenizer.encode(pair)
    keep = overlong(len(ids) + 1, source) - 1
    if keep < 1:
        raise ValueError(f"example {source}: seq_len={seq_len} leaves no room for the text")
    ids = np.asarray(ids[:keep] + [tokenizer.eos_id], np.int32)
    n = len(ids)
    return {"inputs": _pad(ids, seq_len, tokenizer.pad_id), "targets": _pad(ids[1:], seq_len),
            "loss_mask": _pad(np.ones(n - 1, np.float32), seq_len), "last_index": np.int32(n - 1),
            "labels": np.int32(schemas.label_id(schemas.decode_label(r["label"]), labels, f"example {source}"))}


def classify_dataset(path: str, tokenizer, *, labels: list[str], seq_len: int, batch_size: int, seed: int,
                     split: str = "train", process_index: int = 0, process_count: int = 1,
                     num_epochs: Optional[int] = None, overlong: str = "error", cache_dir: Optional[str] = None,
                     eval_fraction: float = 0.05, field_map=None) -> grain.IterDataset:
    """Batches of labelled texts or text pairs (`{text, label}` / `{text, text_pair, label}` rows, any format of
    `lm.data.builders`, columns renamed by `field_map`, e.g. GLUE's "sentence1=text,sentence2=text_pair"), one
    row each, right-padded with the tokenizer's pad id, for lm.classify.

    labels: the run's class names (`schemas.label_names`); each row's label maps onto them (`schemas.label_id`).
    Keys: `inputs` int32 `[B, T]`; `last_index` int32 `[B]` (the final eos); `labels` int32 `[B]` (-1: a padding
    row of a finite pass's last batch); `targets` / `loss_mask` `[B, T]`, next-token targets over the row for an
    auxiliary LM loss. A finite pass (`num_epochs`) gives every process the same number of batches, so it can be
    an evaluation that covers the whole split.
    """
    check = _Overlong(overlong, seq_len)
    ds = _records("classify", path, split, seed=seed, process_index=process_index, process_count=process_count,
                  num_epochs=num_epochs, cache_dir=cache_dir, eval_fraction=eval_fraction, field_map=field_map,
                  even_shards=num_epochs is not None)
    it = ds.map(lambda r: _classify_example(r, tokenizer, labels, seq_len, check)).to_iter_dataset(_READ)
    return _batch(it, batch_size, num_epochs is not None)


def preference_dataset(path: str, tokenizer, *, seq_len: int, k: int, batch_size: int, seed: int,
                       split: str = "train", process_index: int = 0, process_count: int = 1,
                       num_epochs: Optional[int] = None, overlong: str = "error", cache_dir: Optional[str] = None,
                       eval_fraction: float = 0.05, field_map=None) -> grain.IterDataset:
    """Batches of K ranked responses per prompt, for reward models (all pairs) and DPO, from preference rows
    (any format and schema of `lm.data.builders`, columns renamed by `field_map`).

    Each response is `prompt_ids(prompt) + format_response(response)` (`lm.data.chat`: the reply and its
    eos or end of turn); responses are sorted best first; rows with
    fewer than `k` responses are filled with absent ones (rank -1, length 0). Keys (P = k(k-1)/2 pairs):
      tokens int32 `[B, K, T]`; lengths, last_index (the eos or end-of-turn token, where a reward model reads
      its score),
      prompt_len, ranks int32 `[B, K]`; inputs / targets / loss_mask `[B, K, T]` in the LM convention with
      the loss on response tokens only; chosen_index / rejected_index int32 `[B, P]` (slots into K) and
      pair_mask float32 `[B, P]` (1 where the pair is a strict preference). `preference_pairs` gathers them.
    """
    if k < 2:
        raise ValueError(f"k={k}: a preference needs at least two responses")
    check = _Overlong(overlong, seq_len)
    ds = _records("preference", path, split, seed=seed, process_index=process_index, process_count=process_count,
                  num_epochs=num_epochs, cache_dir=cache_dir, eval_fraction=eval_fraction, field_map=field_map)
    it = ds.map(lambda r: _preference_example(r, tokenizer, k, seq_len, check)).to_iter_dataset(_READ)
    return _batch(it, batch_size, num_epochs is not None)


def preference_pairs(batch: dict) -> dict:
    """The chosen/rejected view of a preference batch, flattened over `N = B * P` pairs.

    Returns `{"chosen": {inputs, targets, loss_mask, last_index...}, "rejected": {...}, "pair_mask": [N]}`
    where each side holds `[N, T]` LM arrays (loss on response tokens only) and `[N]` per-sequence values.
    Works on NumPy and JAX arrays (inside `jit` too).
    """
    b, p = batch["chosen_index"].shape
    rows = np.arange(b)[:, None]

    def side(index):
        return {key: batch[key][rows, index].reshape((b * p,) + batch[key].shape[2:])
                for key in ("inputs", "targets", "loss_mask", "tokens", "lengths", "last_index", "prompt_len",
                            "ranks")}
    return {"chosen": side(batch["chosen_index"]), "rejected": side(batch["rejected_index"]),
            "pair_mask": batch["pair_mask"].reshape(b * p)}


def read_prompts(path: str, tokenizer, width: int, field_map=None) -> list[np.ndarray]:
    """Chat-formatted prompt token ids of every row under `path` (prompt files, or the prompts of SFT or
    preference files: `lm.data.builders.prompt_rows`); bad rows name their file and row."""
    prompts = []
    for source, messages in builders.prompt_rows(path, field_map):
        try:
            ids = chat.prompt_ids(tokenizer, messages)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e
        if len(ids) > width:
            raise ValueError(f"{source}: the formatted prompt has {len(ids)} tokens, more than "
                             f"data.prompt_len={width}")
        prompts.append(ids)
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def prompt_dataset(prompts: list[np.ndarray], *, width: int, batch_size: int, seed: int, pad_id: int,
                   process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Endless shuffled batches `{"tokens": int32 [B, width] right-padded, "lengths": int32 [B]}` of prompts
    (token ids, e.g. from `read_prompts`), for RL rollouts.

    Each process takes its own slice of the prompts; the iterator's position is checkpointable.
    """
    def pad(ids):
        return {"tokens": np.concatenate([ids, np.full(width - len(ids), pad_id, np.int32)]).astype(np.int32),
                "lengths": np.int32(len(ids))}
    ds = grain.MapDataset.source(prompts)[process_index::process_count].shuffle(seed).repeat(None).map(pad)
    return ds.to_iter_dataset().batch(batch_size, drop_remainder=True)
