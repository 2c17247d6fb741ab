"""Starting from a Hugging Face checkpoint, end to end: a tiny random `LlamaForCausalLM` directory with its own
byte-level BPE tokenizer and Llama-3 chat template -> SFT on an Alpaca JSON list (3 steps) -> reward model on
UltraFeedback-style message pairs (3) -> PPO on the prompts of those pairs (2) -> export -> transformers loads
the exports (policy and reward model) and computes what the runs compute."""
import json
import os

import numpy as np
import pytest
import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

import configs.ppo
import configs.reward
import configs.sft
import lm
from lm import hf, runs, stages
from lm.data import chat
from rl import reward as reward_lib
from rl import stages as rl_stages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] "
          "+ '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def _rows(name):
    with open(os.path.join(REPO, "data", name), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _checkpoint(root):
    """A tiny random Llama directory: model (GQA, 2 layers) and tokenizer, as `save_pretrained` writes them."""
    sft = _rows("sft/sample.jsonl")
    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([r["prompt"] + " " + r["response"] for r in sft], trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[
            "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|pad|>"]))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|begin_of_text|>",
                                               eos_token="<|eot_id|>", pad_token="<|pad|>",
                                               additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>"])
    tok.chat_template = LLAMA3
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    path = root / "llama"
    model.to(torch.bfloat16).save_pretrained(path)  # as released checkpoints are stored
    tok.save_pretrained(path)
    return str(path)


def _data(root):
    """The bundled SFT rows as an Alpaca JSON list; the bundled pairs as chat-message lists (UltraFeedback)."""
    alpaca = [{"instruction": r["prompt"], "input": "", "output": r["response"]} for r in _rows("sft/sample.jsonl")]
    (root / "alpaca.json").write_text(json.dumps(alpaca, indent=1, ensure_ascii=False))
    pairs = [{"chosen": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}],
              "rejected": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["rejected"]}]}
             for r in _rows("preference/sample.jsonl") if "chosen" in r]
    with open(root / "pairs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
    return str(root / "alpaca.json"), str(root / "pairs.jsonl")


def _config(module, init_from, path, steps, cache):
    c = module.get_config("tiny")
    c.init_from, c.data.path, c.train.steps, c.train.eval_every = init_from, path, steps, 0
    c.checkpoint.every_steps, c.checkpoint.async_save = 0, False
    if "cache_dir" in c.data:
        c.data.cache_dir = cache
    return c


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_start")
    ckpt = _checkpoint(root)
    alpaca, pairs = _data(root)
    cache = str(root / "cache")
    sft = stages.sft(_config(configs.sft, ckpt, alpaca, 3, cache), str(root / "sft"))
    c = _config(configs.reward, sft, pairs, 3, cache)
    c.data.k, c.train.batch_size, c.reward.normalize_batches = 2, 8, 1
    c.reward.lm_coef = 0.1  # the LM head trains too ("lm+scalar"); PPO and the export read the scalar model
    rm = rl_stages.reward(c, str(root / "reward"))
    c = _config(configs.ppo, sft, pairs, 2, cache)
    c.reward_from, c.train.batch_size, c.ppo.response_length, c.ppo.ptx_coef = rm, 8, 8, 0.0
    c.data.prompt_len = 48
    ppo = rl_stages.ppo(c, str(root / "ppo"))
    return {"root": root, "checkpoint": ckpt, "sft": sft, "reward": rm, "ppo": ppo}


def test_runs_keep_the_checkpoint_tokenizer_and_template(pipeline):
    ref = transformers.AutoTokenizer.from_pretrained(pipeline["checkpoint"])
    for stage in ("sft", "reward", "ppo"):
        tok = lm.tokenizer.load(pipeline[stage])
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]
        assert tok.apply_chat_template(messages, add_generation_prompt=True) == ref.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert chat.stop_id(tok) == ref.convert_tokens_to_ids("<|eot_id|>")
    for stage in ("sft", "reward", "ppo"):  # trained in float32 although the checkpoint is stored in bfloat16
        assert runs.load_meta(pipeline[stage])["model"]["param_dtype"] == "float32"
    trained = [json.loads(line) for line in open(os.path.join(pipeline["ppo"], "metrics.jsonl"))]
    assert [r["step"] for r in trained if "kl" in r] == [1, 2]


def test_policy_export_loads_in_transformers(pipeline):
    out = str(hf.export_run(pipeline["ppo"], str(pipeline["root"] / "export_ppo")))
    cfg, params, tok = lm.load(pipeline["ppo"])
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "Why is the sky blue? Air molecules scatter blue sunlight."
    ids = tok.encode(text)
    assert hf_tok.encode(text, add_special_tokens=False) == ids
    ours = np.asarray(lm.Transformer(cfg).apply({"params": params}, np.asarray([ids])))
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
    # The policy moved away from the checkpoint it started from.
    start = transformers.AutoModelForCausalLM.from_pretrained(pipeline["checkpoint"], dtype=torch.float32).eval()
    with torch.no_grad():
        assert np.abs(start(torch.tensor([ids])).logits.numpy() - theirs).max() > 1e-3


def test_reward_export_scores_equally_in_transformers(pipeline):
    assert runs.load_meta(pipeline["reward"])["head"] == "lm+scalar"  # trained with reward.lm_coef
    out = str(hf.export_run(pipeline["reward"], str(pipeline["root"] / "export_rm")))
    cfg, params = reward_lib.load(pipeline["reward"], normalize=False)
    assert "lm_head" not in params
    tok = lm.tokenizer.load(pipeline["reward"])
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    rows = [np.concatenate([chat.prompt_ids(tok, prompt), chat.format_response(tok, r, prompt)])
            for r in ("The capital of France is Paris.", "France is a country in Europe.")]
    width = max(map(len, rows))
    tokens = np.stack([np.pad(r, (0, width - len(r)), constant_values=tok.pad_id) for r in rows])
    last = np.asarray([len(r) - 1 for r in rows])
    ours = np.asarray(reward_lib.score_responses(cfg, params, tokens[None], last[None]))[0]
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.numpy()[:, 0]
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
    assert os.path.isfile(os.path.join(out, reward_lib.NORM_FILE))
