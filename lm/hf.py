"""Hugging Face checkpoints <-> (`ModelConfig`, params): `load(path)`, `save(cfg, params, path)` and `export_run`.

Reads and writes safetensors directly with NumPy (no torch): tensors are read one at a time, split or
transposed into our layout and written into the scanned `[n_layers, ...]` leaves, so peak memory is one
copy of the model plus one tensor. Supported architectures and their layouts live in `lm.hf_arch`.

A reward model (`Transformer(cfg, head="scalar")`, params with a `score` head) is written as its family's
`*ForSequenceClassification` (`num_labels=1`, `score.weight` [1, d], the causal LM's trunk tensors) and read back;
a classifier likewise with `num_labels=cfg.num_labels` (`score.weight` [N, d]) and its class names as
`id2label` / `label2id`. transformers scores the last token that is not `config.pad_token_id` (right or left
padding), as `rl.reward.score_responses` and `lm.classify` read `last_index` when pad differs from eos; a
tokenizer without a pad token (ours is then eos) gets `pad_token_id: null`, with which transformers scores the
last token and refuses batches of several sequences (score them one at a time, unpadded).
"""
from __future__ import annotations

import contextlib
import json
import pathlib
import re
from typing import Optional

import flax.linen as nn
import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy, which safetensors' NumPy reader needs)
import numpy as np
import safetensors.numpy
from safetensors import safe_open

from lm import hf_arch
from lm.config import ModelConfig
from lm.model import init_params

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Buffers some checkpoints store that are recomputed rather than learned.
_IGNORED = re.compile(r"(rotary_(pos_)?emb\.inv_freq|(attn|attention)\.(bias|masked_bias))$")
_SCORE_BIAS = "score/bias"
# num_labels is written as id2label by `_hf_config` itself, not by an architecture's mapping.
_COMPARE_SKIP = ("dtype", "param_dtype", "attention_impl", "remat", "scan_unroll", "init_std", "embed_grad_scale",
                 "num_labels")


def _read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}")
    with open(path) as f:
        return json.load(f)


class _Reader:
    """Tensor-by-tensor access to a single or sharded safetensors checkpoint."""

    def __init__(self, path: pathlib.Path, stack: contextlib.ExitStack):
        self.path, self._stack, self._open = path, stack, {}
        if (path / INDEX).is_file():
            self.files = {k: path / f for k, f in _read_json(path / INDEX)["weight_map"].items()}
        elif (path / WEIGHTS).is_file():
            with safe_open(path / WEIGHTS, framework="numpy") as f:
                self.files = {k: path / WEIGHTS for k in f.keys()}
        else:
            hint = " (pytorch_model.bin is not read: save with safe_serialization)" if any(
                path.glob("pytorch_model*.bin")) else ""
            raise FileNotFoundError(f"no weights in {path}: expected {path / WEIGHTS} or {path / INDEX}{hint}")
        self.used: set[str] = set()

    def resolve(self, name: str, base_prefix: str) -> str:
        if name not in self.files and base_prefix and name.startswith(base_prefix):
            if name[len(base_prefix):] in self.files:  # checkpoint of the bare base model
                return name[len(base_prefix):]
        if name not in self.files:
            raise KeyError(f"tensor {name!r} not found in {self.path}")
        return name

    def _handle(self, file: pathlib.Path):
        if file not in self._open:
            if not file.is_file():
                raise FileNotFoundError(f"missing shard {file} (listed in {self.path / INDEX})")
            self._open[file] = self._stack.enter_context(safe_open(file, framework="numpy"))
        return self._open[file]

    def get(self, name: str, shape: tuple) -> np.ndarray:
        """Tensor `name`, after checking it has `shape`."""
        handle = self._handle(self.files[name])
        found = tuple(handle.get_slice(name).get_shape())
        if found != tuple(shape):
            raise ValueError(f"tensor {name!r} in {self.files[name]} has shape {found}, but config.json "
                             f"implies {tuple(shape)}")
        self.used.add(name)
        return handle.get_tensor(name)


def _dtype_name(dtype) -> str:
    return np.dtype(dtype).name


def _expected_shapes(cfg: ModelConfig, head: str = "lm") -> dict[str, tuple]:
    """Our parameter leaves as slash-joined paths -> shapes (nothing allocated)."""
    tree = jax.eval_shape(lambda r: init_params(cfg, r, head), jax.random.key(0))
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(k.key for k in path): tuple(x.shape) for path, x in flat}


def _set(tree: dict, path: str, value):
    *parents, last = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[last] = value


def _get(tree: dict, path: str):
    for p in path.split("/"):
        tree = tree[p]
    return tree


def _check_cover(arch: hf_arch.Arch, maps, shapes: dict):
    """Every leaf of our model comes from exactly the tensors of `maps` (a mapping bug otherwise); the score bias
    has no HF tensor (it must be zero)."""
    covered = {o for m in maps for o in m.ours} | ({_SCORE_BIAS} & set(shapes))
    if covered != set(shapes):
        raise ValueError(f"{arch.name} tensor map does not match the model: leaves without a tensor "
                         f"{sorted(set(shapes) - covered)}, unknown leaves {sorted(covered - set(shapes))}")


def head_of(path) -> str:
    """"scalar" when the Hugging Face directory `path` holds a reward model or classifier (config.json's
    architecture is a `*ForSequenceClassification`), else "lm"."""
    archs = _read_json(pathlib.Path(path) / "config.json").get("architectures") or [None]
    return hf_arch.head_of(archs[0])


def _num_labels(hf: dict) -> int:
    """num_labels as transformers resolves it: the `id2label` entries, else `num_labels`, else 2."""
    id2label = hf.get("id2label")
    return len(id2label) if id2label else int(hf.get("num_labels") or 2)


def labels(path) -> Optional[list[str]]:
    """The class names (`id2label`, index = class id) of a Hugging Face classifier with two or more labels;
    None for a language or reward model."""
    hf = _read_json(pathlib.Path(path) / "config.json")
    if head_of(path) != "scalar" or _num_labels(hf) == 1:
        return None
    id2label = hf.get("id2label") or {}
    return [str(id2label.get(str(i), f"LABEL_{i}")) for i in range(_num_labels(hf))]


def _read_config(path: pathlib.Path, dtype=None) -> tuple[ModelConfig, hf_arch.Arch, str]:
    """`(cfg, arch, head)` of an HF directory's config.json (a classifier's `num_labels` included); unknown keys
    are refused."""
    hf = hf_arch.HFConfig(_read_json(path / "config.json"))
    archs = hf.get("architectures") or [None]
    arch, head = hf_arch.get(archs[0]), hf_arch.head_of(archs[0])
    target = _dtype_name(dtype or hf.get("dtype") or hf.get("torch_dtype") or "float32")
    fields = arch.from_hf(hf)
    hf_arch.check_consumed(hf, arch.name)
    num_labels = _num_labels(hf) if head == "scalar" else 1
    return ModelConfig(**fields, num_labels=num_labels, dtype=target, param_dtype=target), arch, head


def load_config(path, *, dtype=None) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face directory, as `load` gives it, without reading any tensor."""
    return _read_config(pathlib.Path(path), dtype)[0]


def load(path, *, dtype=None) -> tuple[ModelConfig, dict]:
    """Read a Hugging Face directory (config.json + model.safetensors or a sharded index).

    A `*ForSequenceClassification` directory (see `head_of`: a reward model, or a classifier whose
    `cfg.num_labels` is config.json's and whose class names `labels` gives) gets a `score` head
    (`Transformer(cfg, head="scalar")`) whose bias, which transformers' score layer lacks, is zero.

    Args:
      path: the directory `save_pretrained` wrote.
      dtype: dtype of the returned parameters (and of `cfg.dtype` / `cfg.param_dtype`); None keeps the
        checkpoint's `dtype` / `torch_dtype` from config.json (float32 if it names none).
    Returns:
      `(cfg, params)`: the `ModelConfig` and the parameter tree of `Transformer(cfg)`, with NumPy leaves in
      host memory (place them with `jax.device_put(params, shardings)`).
    """
    path = pathlib.Path(path)
    cfg, arch, head = _read_config(path, dtype)
    target = cfg.param_dtype
    shapes = _expected_shapes(cfg, head)
    maps = arch.tensor_maps(cfg, head)
    _check_cover(arch, maps, shapes)
    params: dict = {}
    if head == "scalar":
        _set(params, _SCORE_BIAS, np.zeros(shapes[_SCORE_BIAS], target))
    with contextlib.ExitStack() as stack:
        reader = _Reader(path, stack)
        for m in maps:
            layered = "{i}" in m.hf
            per_layer = [shapes[o][1:] if layered else shapes[o] for o in m.ours]
            names = [m.hf.format(i=i) for i in range(cfg.n_layers)] if layered else [m.hf]
            bufs = [np.empty(shapes[o], target) for o in m.ours]
            for i, name in enumerate(names):
                tensor = reader.get(reader.resolve(name, arch.base_prefix), m.hf_shape(per_layer))
                for buf, piece in zip(bufs, m.from_hf(tensor, per_layer)):
                    if layered:
                        buf[i] = piece
                    else:
                        buf[...] = piece
            for o, buf in zip(m.ours, bufs):
                _set(params, o, buf)
        unused = sorted(k for k in set(reader.files) - reader.used if not _IGNORED.search(k)
                        and not (cfg.tie_embeddings and k.endswith("lm_head.weight")))
        if unused:
            raise ValueError(f"{len(unused)} tensor(s) in {path} are not used by {arch.name}: {unused[:8]}")
    return cfg, params


def _canonical(cfg: ModelConfig) -> dict:
    """The fields that change what the model computes, with defaults resolved."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in _COMPARE_SKIP}
    d.update(n_kv_heads=cfg.kv_heads, head_dim=cfg.dim_per_head, deepnorm_alpha=cfg.alpha,
             query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.dim_per_head)
    if cfg.mlp == "swiglu":
        d.pop("gelu_approximate")
    if cfg.position not in ("rope", "rope2d"):
        for k in ("rope_theta", "rope_fraction", "rope_interleaved"):
            d.pop(k)
    if cfg.rope_scaling == "none" or cfg.position not in ("rope", "rope2d"):
        for k in [k for k in d if k.startswith("rope_") and k not in ("rope_theta", "rope_fraction",
                                                                       "rope_interleaved")]:
            d.pop(k)
    if cfg.sliding_window is None:
        d.pop("window_pattern")
    else:  # one letter per layer: "L" and "LL" are the same model
        d["window_pattern"] = "".join(cfg.window_pattern[i % len(cfg.window_pattern)] for i in range(cfg.n_layers))
    return d


def _hf_config(cfg: ModelConfig, arch: hf_arch.Arch, head: str = "lm", labels: Optional[list] = None) -> dict:
    """`arch`'s config.json for `cfg` (with `head`; a score head's class names `labels`, default transformers'
    `LABEL_i`); an error lists every field the architecture cannot express."""
    hf = dict(arch.to_hf(cfg), architectures=[hf_arch.hf_name(arch, head)], dtype=cfg.param_dtype)
    if head == "scalar":  # transformers reads num_labels from id2label
        names = [str(x) for x in labels] if labels is not None else [f"LABEL_{i}" for i in range(cfg.num_labels)]
        if len(names) != cfg.num_labels or len(set(names)) != len(names):
            raise ValueError(f"labels {names} must be {cfg.num_labels} distinct names, one per output of the score "
                             "head")
        hf.update(id2label={str(i): n for i, n in enumerate(names)}, label2id={n: i for i, n in enumerate(names)})
    ours, back = _canonical(cfg), _canonical(ModelConfig(**arch.from_hf(hf)))
    diff = [f"{k}={ours[k]!r} ({arch.name} gives {back.get(k)!r})" for k in ours if ours[k] != back.get(k)]
    if diff:
        raise ValueError(f"ModelConfig cannot be written as {arch.name}: {', '.join(diff)}")
    return hf


def save(cfg: ModelConfig, params, path, *, architecture: Optional[str] = None, head: Optional[str] = None,
         max_shard_size: int = 5 * 2**30, extra_config: Optional[dict] = None,
         labels: Optional[list] = None) -> pathlib.Path:
    """Write `params` of `Transformer(cfg, head)` as a Hugging Face directory `transformers` can load.

    A language model (head "lm") is written as the causal LM; a reward model or classifier (head "scalar") as the
    family's `*ForSequenceClassification` with `cfg.num_labels` labels (`AutoModelForSequenceClassification`
    loads it): `score.weight` holds our `score/kernel`. transformers' score layer has no bias, so a non-zero
    `score/bias` is refused. A trained reward model's bias stays 0 (the ranking loss ignores shifts), as does a
    classifier's (lm.classify never trains it), but `rl.reward.normalize_head` folds a reward model's score mean
    into it: export the raw params and apply `reward_norm.json` yourself. The scored token is the last
    one that is not `pad_token_id` (pass it in `extra_config`; see the module docstring).

    Args:
      cfg, params: the model (params as from `init_params` or `load`; leaves keep their dtype).
      path: output directory (created).
      architecture: HF architecture name (see `lm.hf_arch.ARCHS`); None picks it from `cfg`
        (`lm.hf_arch.default_for`): Gemma norms / sandwich norms -> Gemma2 (Gemma3 with q/k norms or a local
        RoPE base), parallel residual or LayerNorm + RoPE -> GPT-NeoX, learned positions -> OPT (with a
        position offset or a ReLU MLP) or GPT-2, DeepNorm / 2D RoPE -> ChatGLM-6B, ALiBi + LayerNorm -> BLOOM,
        ALiBi + RMSNorm -> Baichuan, q/k norms -> Qwen3, interleaved RoPE -> GLM-4, q/k/v biases without an
        output bias -> Qwen2, partial RoPE -> Phi-3, a sliding window -> Mistral, other RoPE (scaled or not)
        -> LLaMA. Baichuan and ChatGLM are remote-code architectures: `transformers` needs their modeling code
        to instantiate them. ChatGLM2/3-6B is written only when asked for (`architecture="ChatGLMModel"` with
        a config that is not ChatGLM-6B's). A reward model may be named by either of its family's names (e.g.
        `LlamaForCausalLM` or `LlamaForSequenceClassification`); families without a sequence-classification
        class in transformers (Baichuan, ChatGLM) are refused.
      head: "lm" or "scalar"; None: "scalar" when `params` hold a `score` head, else "lm" (the language-model
        head of an "lm+scalar" classifier is not written).
      max_shard_size: bytes per safetensors file; larger models are sharded with an index.
      extra_config: entries added to config.json, e.g. `{"bos_token_id": 1, "eos_token_id": 2}` (a
        `ModelConfig` knows no token ids, so they are written as null unless given here).
      labels: a classifier's class names (index = class id), written as `id2label` / `label2id`; None:
        `LABEL_0`, `LABEL_1`, ...
    Returns:
      The directory.
    """
    params = nn.unbox(params)
    head = head or ("scalar" if "score" in params else "lm")
    arch = hf_arch.get(architecture or hf_arch.default_for(cfg))
    if architecture is not None and hf_arch.head_of(architecture) == "scalar" and head != "scalar":
        raise ValueError(f"architecture {architecture} is a reward model, but the params have a {head!r} head")
    hf = _hf_config(cfg, arch, head, labels)
    shapes = _expected_shapes(cfg, head)
    for leaf, shape in shapes.items():
        try:
            got = tuple(np.shape(_get(params, leaf)))
        except KeyError:
            raise ValueError(f"params lack {leaf!r}, which Transformer(cfg, head={head!r}) has") from None
        if got != shape:
            raise ValueError(f"param {leaf!r} has shape {got}, but cfg implies {shape}")
    if head == "scalar":
        bias = np.asarray(_get(params, _SCORE_BIAS), np.float32)
        if np.any(bias != 0):
            raise ValueError(f"the score head's bias is {bias.tolist()}, but {hf['architectures'][0]}'s score layer "
                             "has no bias, so the model cannot be written exactly. A trained reward model's bias stays "
                             "0; a non-zero one usually means the params were normalised (rl.reward.normalize_head, "
                             "as rl.reward.load does by default): export the raw run (lm.load / normalize=False) "
                             "and normalise scores with its reward_norm.json instead")
    maps = arch.tensor_maps(cfg, head)
    _check_cover(arch, maps, shapes)

    entries = []  # (hf name, map, layer index or None, bytes)
    for m in maps:
        layered = "{i}" in m.hf
        per_layer = [shapes[o][1:] if layered else shapes[o] for o in m.ours]
        nbytes = int(np.prod(m.hf_shape(per_layer))) * np.dtype(_get(params, m.ours[0]).dtype).itemsize
        for i in range(cfg.n_layers) if layered else [None]:
            entries.append((m.hf if i is None else m.hf.format(i=i), m, i, nbytes))
    shards, size = [[]], 0
    for e in entries:
        if shards[-1] and size + e[3] > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e[3]

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    n = len(shards)
    weight_map = {}
    for s, shard in enumerate(shards):
        file = WEIGHTS if n == 1 else f"model-{s + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for name, m, i, _ in shard:
            leaves = [np.asarray(_get(params, o) if i is None else _get(params, o)[i]) for o in m.ours]
            tensors[name] = np.ascontiguousarray(m.to_hf(leaves))
            weight_map[name] = file
        safetensors.numpy.save_file(tensors, path / file, metadata={"format": "pt"})
        del tensors
    if n > 1:
        index = {"metadata": {"total_size": sum(e[3] for e in entries)}, "weight_map": weight_map}
        (path / INDEX).write_text(json.dumps(index, indent=2))
    hf.update({"bos_token_id": None, "eos_token_id": None, "pad_token_id": None})
    hf.update(extra_config or {})  # after the defaults, so given token ids replace the nulls
    hf["dtype"] = _dtype_name(_get(params, "embed/embedding").dtype)
    (path / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
    return path


REWARD_NORM = "reward_norm.json"  # rl.reward.NORM_FILE (lm does not import rl): score mean/std of the SFT policy


def export_run(run, out, *, architecture: Optional[str] = None, dtype=None, adapter: bool = False) -> pathlib.Path:
    """Write the model and tokenizer of a run directory (any stage) as a Hugging Face directory.

    The model is the one `lm.load` gives: the policy of a pretraining, SFT, DPO or PPO run (a causal LM), the
    raw, unnormalised reward model of a reward run or the classifier of a classification run, with its class
    names (`lm.runs.labels`), as a `*ForSequenceClassification` (see `save`). config.json
    gets the tokenizer's bos/eos/pad ids (pad null when the tokenizer has none and pads with eos); the
    tokenizer is written with `lm.tokenizers.save`. A reward run's `reward_norm.json` ({"mean", "std"} of the
    SFT policy's scores) is copied beside: `(score - mean) / std` is the normalised reward `rl.reward.load` gives.

    Args:
      run: a run directory (or its `checkpoints/`), or a Hugging Face directory.
      out: output directory (created).
      architecture: HF architecture name; None picks it from the model config (see `save`).
      dtype: dtype of the written weights (e.g. "bfloat16"); None keeps the checkpoint's.
      adapter: for a run of adapters on a causal LM: write the model it adapted (float, as it was before any
        quantisation) to `out` and the adapters in PEFT's format to `out/adapter` (lm.hf_adapter), for
        `peft.PeftModel.from_pretrained(model, out/adapter)`; without it the adapters are merged in.
    Returns:
      The output directory.
    """
    from lm import peft, runs, tokenizers

    run = str(run)
    trainable = None
    if adapter:
        adapted, params, trainable = runs.load_adapted(run)
        if "score" in trainable:
            raise ValueError(f"{run} holds reward-model adapters: PEFT adapters are written for causal LMs only; "
                             "export it without --adapter (merged)")
        cfg, tok = peft.plain_config(adapted), runs.tokenizer_of(run)
    else:
        cfg, params, tok = runs.load(run)
    if tok is None:
        raise FileNotFoundError(f"no tokenizer in {runs.home(run)}: expected {tokenizers.TOKENIZER_JSON} or "
                                f"{tokenizers.SP_MODEL}")
    params = jax.tree.map(lambda a: np.asarray(a) if dtype is None else np.asarray(a).astype(dtype), params)
    # transformers scores the last token that is not pad: a pad that is also the eos or end of turn would
    # move that token off the one our reward model reads (see the module docstring).
    ends = {tok.eos_id} | ({tok.end_of_turn_id()} if getattr(tok, "chat_template", None) else set())
    pad = None if tok.pad_id in ends else tok.pad_id  # a tokenizer that pads with eos (`pad_is_eos`) included
    out = save(cfg, params, out, architecture=architecture, labels=runs.labels(run), extra_config={
        "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": pad})
    tokenizers.save(tok, out)
    norm = pathlib.Path(runs.home(run)) / REWARD_NORM
    if "score" in params and norm.is_file():
        (out / REWARD_NORM).write_bytes(norm.read_bytes())
    if trainable is not None:
        from lm import hf_adapter

        trainable = jax.tree.map(np.asarray, trainable)
        hf_adapter.save_adapter(adapted, trainable, out / "adapter", architecture=architecture,
                                base_model_name_or_path=str(out))
    return out
