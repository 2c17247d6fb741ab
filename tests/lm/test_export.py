"""Export to Hugging Face: reward models as *ForSequenceClassification, tokenizers for AutoTokenizer, whole runs."""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers as tr
import test_tokenizers
from test_tokenizers import CHAT, CORPUS, TEXTS

import lm
from lm import checkpoint, hf, presets, runs
from lm import tokenizers as toks
from lm.tokenizer import Tokenizer
from lm.train_step import TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
V, PAD, BOS, EOS = 96, 0, 2, 3
dirs = test_tokenizers.dirs  # the HF (a: BPE + ChatML, b: byte-level + Llama-3) and SentencePiece fixtures
MIXED = TEXTS + ["", " ", "  two leading", "trailing  \n", "digits 1234567890 and 3.14", "repeated   spaces\n\n\n x",
                 "🙂🙂🙂 emoji 👍🏽", "code: for i in range(10):\n    print(i)  # loop"]


def _params(cfg, head, seed=0):
    """Random float32 NumPy params of `Transformer(cfg, head)`; a scalar head's bias is 0, as training leaves it."""
    rng = np.random.RandomState(seed)
    shapes = jax.eval_shape(lambda r: lm.init_params(cfg, r, head), jax.random.key(0))
    params = jax.tree.map(lambda s: rng.normal(0, 0.2, s.shape).astype(np.float32), shapes)
    if head == "scalar":
        params["score"]["bias"] = np.zeros(cfg.num_labels, np.float32)
    return params


def _right_padded(seed=0):
    """[3, 10] ids in [4, V) right-padded with PAD, and each row's last non-pad index."""
    rs = np.random.RandomState(seed)
    lengths = np.array([10, 6, 3])
    toks_ = rs.randint(4, V, (3, 10))
    toks_[np.arange(10)[None] >= lengths[:, None]] = PAD
    return toks_, lengths - 1


# (preset, overrides): GQA + untied head; q/k/v biases; learned positions + tied embeddings; parallel residual;
# a sliding window; q/k norms; fused qkv/gate-up tensors; (1 + w) sandwich norms, local/global layers and soft-caps;
# learned positions with an offset and ReLU.
REWARD_CASES = [("llama-tiny", {}), ("qwen2-tiny", {}), ("gpt2-tiny", {}), ("neox-tiny", {"tie_embeddings": True}),
                ("mistral-tiny", {"sliding_window": 4}), ("qwen3-tiny", {}), ("phi3-tiny", {}), ("gemma2-tiny", {}),
                ("gemma3-tiny", {"sliding_window": 4}), ("opt-tiny", {})]


@pytest.mark.parametrize("preset,overrides", REWARD_CASES, ids=[c[0] for c in REWARD_CASES])
def test_reward_model_as_sequence_classification(preset, overrides, tmp_path):
    cfg = presets.get(preset, vocab_size=V, dtype="float32", **overrides)
    params = _params(cfg, "scalar")
    hf.save(cfg, params, tmp_path, extra_config={"pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"][0].endswith("ForSequenceClassification") and len(config["id2label"]) == 1
    assert (config["pad_token_id"], config["bos_token_id"], config["eos_token_id"]) == (PAD, BOS, EOS)
    ids, last = _right_padded()
    values = jax.jit(lm.Transformer(cfg, head="scalar").apply)({"params": params}, jnp.asarray(ids))  # [B, T]
    ours = np.asarray(values)[np.arange(len(ids)), last]
    model = tr.AutoModelForSequenceClassification.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = model(torch.tensor(ids)).logits.numpy()
    assert theirs.shape == (3, 1)
    np.testing.assert_allclose(theirs[:, 0], ours, atol=1e-4, rtol=1e-4)
    # round trip, and lm.load reads the directory as a reward model
    assert hf.head_of(tmp_path) == "scalar"
    cfg2, back = hf.load(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    assert cfg2.tie_embeddings == cfg.tie_embeddings
    assert "score" in runs.load(str(tmp_path), head="scalar")[1]
    with pytest.raises(ValueError, match="reward model .*not the 'lm' head"):
        runs.load(str(tmp_path), head="lm")


def test_reward_export_refusals(tmp_path):
    cfg = presets.get("llama-tiny", vocab_size=V, dtype="float32")
    params = _params(cfg, "scalar")
    params["score"]["bias"] = np.full(1, 0.5, np.float32)
    with pytest.raises(ValueError, match="no bias.*normalize_head"):
        hf.save(cfg, params, tmp_path / "biased")
    with pytest.raises(ValueError, match="BaichuanForCausalLM has no \\*ForSequenceClassification"):
        hf.save(cfg, _params(cfg, "scalar"), tmp_path / "b", architecture="BaichuanForCausalLM")
    glm = presets.get("glm-tiny", vocab_size=V)
    with pytest.raises(ValueError, match="ChatGLMForConditionalGeneration has no"):
        hf.save(glm, _params(glm, "scalar"), tmp_path / "glm")
    with pytest.raises(ValueError, match="is a reward model, but the params have a 'lm' head"):
        hf.save(cfg, _params(cfg, "lm"), tmp_path / "lm", architecture="LlamaForSequenceClassification")
    # labels that do not match the head's outputs
    with pytest.raises(ValueError, match=r"labels \['NEG', 'POS'\] must be 1 distinct names"):
        hf.save(cfg, _params(cfg, "scalar"), tmp_path / "two", labels=["NEG", "POS"])


@pytest.mark.parametrize("preset", ["qwen2-tiny", "gpt2-tiny"])
def test_classifier_as_sequence_classification(preset, tmp_path):
    # GQA with q/k/v biases; learned positions, tied embeddings and Conv1D layouts. Rows right-padded with PAD:
    # transformers reads each row's last non-pad token, where ours reads it.
    cfg = presets.get(preset, vocab_size=V, dtype="float32", num_labels=3)
    params = _params(cfg, "scalar")
    hf.save(cfg, params, tmp_path, labels=["neg", "neutral", "pos"], extra_config={"pad_token_id": PAD})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"} and config["label2id"]["pos"] == 2
    ids, last = _right_padded()
    values = jax.jit(lm.Transformer(cfg, head="scalar").apply)({"params": params}, jnp.asarray(ids))  # [B, T, 3]
    ours = np.asarray(values)[np.arange(len(ids)), last]
    model = tr.AutoModelForSequenceClassification.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
    cfg2, back = hf.load(tmp_path)
    assert cfg2.num_labels == 3 and hf.labels(tmp_path) == ["neg", "neutral", "pos"]
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_lm_export_writes_token_ids(tmp_path):
    cfg = presets.get("qwen2-tiny", vocab_size=V, dtype="float32")
    hf.save(cfg, _params(cfg, "lm"), tmp_path, extra_config={"bos_token_id": 1, "eos_token_id": 2})
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, None)
    assert hf.head_of(tmp_path) == "lm" and config["architectures"] == ["Qwen2ForCausalLM"]


def _check_tokenizer(ours, out, chat=True):
    ref = tr.AutoTokenizer.from_pretrained(out)
    for text in MIXED:
        assert ref.encode(text, add_special_tokens=False) == ours.encode(text), repr(text)
    for name in ("bos", "eos", "unk"):
        assert getattr(ref, f"{name}_token_id") == getattr(ours, f"{name}_id"), name
    assert ref.pad_token_id == (None if getattr(ours, "pad_is_eos", False) else ours.pad_id)
    if chat:
        expected = ref.apply_chat_template(CHAT, tokenize=True, return_dict=False)
        assert list(expected) == ours.apply_chat_template(CHAT)
        expected = ref.apply_chat_template(CHAT[:2], tokenize=True, add_generation_prompt=True, return_dict=False)
        assert list(expected) == ours.apply_chat_template(CHAT[:2], add_generation_prompt=True)
    return ref


@pytest.mark.parametrize("kind", ["a", "b"])
def test_save_hf_tokenizer(dirs, kind, tmp_path):
    ours = toks.load(dirs[kind])
    toks.save(ours, str(tmp_path))
    _check_tokenizer(ours, tmp_path)
    assert toks.load(str(tmp_path)).apply_chat_template(CHAT) == ours.apply_chat_template(CHAT)


def test_save_sentencepiece_tokenizer(dirs, tmp_path):
    # a Llama-2 style tokenizer.model + tokenizer_config.json (no pad: pad is eos), with a chat template added
    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(dirs["model"], src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "legacy": True, "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
                                         "{{ eos_token }}{% endfor %}"}))
    ours = toks.load(str(src))
    assert isinstance(ours, toks.SentencePieceTokenizer) and ours.pad_is_eos
    toks.save(ours, str(tmp_path / "out"))
    ref = _check_tokenizer(ours, tmp_path / "out")
    assert ref.encode("the sea") == [ours.bos_id] + ours.encode("the sea")  # bos added by default, as Llama does


@pytest.fixture(scope="module")
def project_tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("project_tok")
    (root / "corpus.txt").write_text("\n".join(CORPUS))
    Tokenizer.train([str(root / "corpus.txt")], 500, str(root / "tokenizer"))
    return toks.load(str(root / "tokenizer.model"))


def test_save_project_tokenizer(project_tok, tmp_path):
    assert isinstance(project_tok, toks.ProjectTokenizer)
    toks.save(project_tok, str(tmp_path))
    ref = _check_tokenizer(project_tok, tmp_path)
    assert (ref.bos_token, ref.eos_token, ref.unk_token, ref.pad_token) == ("<s>", "</s>", "<unk>", "<pad>")
    assert ref.decode(project_tok.encode(MIXED[2])) == MIXED[2]
    # control-token strings: transformers maps them to ids, as our chat template encoding does
    text = "<|user|>hi</s>  [MASK]"
    assert ref.encode(text, add_special_tokens=False) == project_tok._encode_with_offsets(text)[0]
    again = toks.load(str(tmp_path))  # the exported directory reads back as an HF tokenizer with the same ids
    assert isinstance(again, toks.HFTokenizer) and all(again.encode(t) == project_tok.encode(t) for t in MIXED)


def _run_dir(root, tok, cfg, params, head):
    """A run directory as the stages leave it: tokenizer.model and an orbax checkpoint whose meta has the model."""
    root.mkdir()
    shutil.copyfile(tok.path, root / "tokenizer.model")
    zero = np.zeros((), np.int32)
    state = TrainState(step=zero, params=params, opt_state=optax.sgd(0.1).init(params), rng=jax.random.key_data(
        jax.random.key(0)), skipped=zero, bad_streak=zero)
    ckpt = checkpoint.Checkpointer(str(root / "checkpoints"), async_save=False)
    ckpt.save(1, state, meta={"model": cfg.to_dict(), "stage": "reward" if head == "scalar" else "sft",
                              "head": head}, force=True)
    ckpt.close()
    return root


def test_export_run(project_tok, tmp_path):
    cfg = presets.get("llama-tiny", vocab_size=project_tok.vocab_size, dtype="float32")
    params = _params(cfg, "lm")
    run = _run_dir(tmp_path / "sft", project_tok, cfg, params, "lm")
    out = hf.export_run(str(run), tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        project_tok.bos_id, project_tok.eos_id, project_tok.pad_id)
    ids = np.asarray([project_tok.encode(MIXED[2])[:12]])
    model = tr.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = model(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(jax.jit(lm.Transformer(cfg).apply)({"params": params}, jnp.asarray(ids)))
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
    assert tr.AutoTokenizer.from_pretrained(out).encode(MIXED[2], add_special_tokens=False) == project_tok.encode(
        MIXED[2])

    # a reward run: the raw scalar head, reward_norm.json beside, bfloat16 on request
    reward = _run_dir(tmp_path / "reward", project_tok, cfg, _params(cfg, "scalar"), "scalar")
    (reward / hf.REWARD_NORM).write_text(json.dumps({"mean": 0.5, "std": 2.0, "count": 8}))
    out = hf.export_run(str(reward), tmp_path / "rm", dtype="bfloat16")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["dtype"] == "bfloat16"
    assert json.loads((out / hf.REWARD_NORM).read_text())["std"] == 2.0


def test_reward_norm_file_name_matches_rl():
    from rl import reward

    assert hf.REWARD_NORM == reward.NORM_FILE


def test_launcher_reports_a_missing_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.export", f"--run={tmp_path / 'no_run'}",
                           f"--out={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"error: {tmp_path / 'no_run'}" in proc.stderr and "Traceback" not in proc.stderr
