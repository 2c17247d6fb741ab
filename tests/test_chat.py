"""The chat REPL: streamed replies equal `lm.generate`, the history is templated and trimmed, `lm.load` reads run
(LM, PPO, reward) and Hugging Face directories onto a mesh, and a scripted session over stdin answers every turn and exits 0."""
import functools
import io
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

import lm
from experiments import chat
from jax.sharding import PartitionSpec as P

from lm import checkpoint, hf, presets, sharding
from lm.data import format_prompt
from lm.generation import generate, stream
from lm.model import abstract_params, init_params
from lm.tokenizer import Tokenizer
from lm.train_step import TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Fields a Hugging Face config.json does not carry (training-time choices).
HF_UNSTORED = ("init_std", "attention_impl", "remat", "scan_unroll", "embed_grad_scale")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("tok") / "tok"
    return Tokenizer.train(os.path.join(ROOT, "data/text/en.txt"), 320, str(prefix), character_coverage=0.99)


@functools.lru_cache(maxsize=None)
def _model(name, vocab_size):
    """A tiny model with NumPy-drawn weights (compiling the random init costs more than the tests themselves);
    their scale, larger than the default init, keeps the next-token distribution far from uniform."""
    cfg = presets.get(name, vocab_size=vocab_size, max_len=128)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    rng = np.random.default_rng(3)
    return cfg, jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def _save(directory, params, meta):
    """An orbax checkpoint as the training stages write it (params, optimiser state, metadata)."""
    tx = optax.adam(1e-3)
    zero = np.zeros((), np.int32)
    state = TrainState(step=zero, params=params, opt_state=tx.init(params), rng=jax.random.PRNGKey(0),
                       skipped=zero, bad_streak=zero)
    ckpt = checkpoint.Checkpointer(str(directory / "checkpoints"), async_save=False)
    ckpt.save(1, state, meta=meta, force=True)
    ckpt.close()


@pytest.fixture(scope="module")
def run_dir(tok, tmp_path_factory):
    """A run directory as the training stages leave it: tokenizer.model and an orbax checkpoint with meta."""
    run = tmp_path_factory.mktemp("run")
    cfg, params = _model("llama-tiny", tok.vocab_size)
    _save(run, params, {"model": cfg.to_dict(), "stage": "sft"})
    shutil.copyfile(tok.path, run / "tokenizer.model")
    (run / "config.json").write_text(json.dumps({"seed": 0, "init_from": "", "model": {"preset": "llama-tiny"}}))
    return run, cfg, params


@pytest.mark.parametrize("name", ["llama-tiny", "glm-tiny"])
def test_greedy_stream_equals_generate(name, tok):
    cfg, params = _model(name, tok.vocab_size)
    prompt = format_prompt(tok, "What is the capital of France?").tolist()
    eos = tok.eos_id
    want = generate(cfg, params, [prompt], 11, eos_id=eos)[0]
    pieces = list(stream(cfg, params, prompt, max_new_tokens=11, eos_id=eos, rng=jax.random.key(0),
                              temperature=0.0, chunk=4))
    assert all(1 <= len(p) <= 4 for p in pieces)
    got = sum(pieces, [])
    assert got == [t for t in want if t != eos]
    assert len(got) == 11 or want[-1] == eos


def test_sampled_stream_respects_top_k_and_length(tok):
    cfg, params = _model("llama-tiny", tok.vocab_size)
    prompt = format_prompt(tok, "Hello").tolist()
    got = sum(stream(cfg, params, prompt, max_new_tokens=10, eos_id=tok.eos_id, rng=jax.random.key(1),
                          temperature=1.0, top_k=1, chunk=4), [])
    greedy = sum(stream(cfg, params, prompt, max_new_tokens=10, eos_id=tok.eos_id, rng=jax.random.key(2),
                             temperature=0.0, chunk=4), [])
    assert got == greedy  # top_k=1 leaves only the argmax
    assert len(got) <= 10
    # Sampled, a stream draws the tokens `generate` draws with the same key.
    want = generate(cfg, params, [prompt], 10, temperature=1.0, eos_id=tok.eos_id, seed=5)[0]
    got = sum(stream(cfg, params, prompt, max_new_tokens=10, eos_id=tok.eos_id, rng=jax.random.key(5),
                     temperature=1.0, chunk=4), [])
    assert got == [t for t in want if t != tok.eos_id] and got != greedy


def test_session_history_template_reset_and_trimming(tok, run_dir):
    _, cfg, params = run_dir
    session = chat.ChatSession(cfg, params, tok, system="Be brief.", temperature=0.0, max_new_tokens=8, chunk=4)
    first = "".join(session.reply("Hi there"))
    assert session.history == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": first}]
    np.testing.assert_array_equal(
        session.prompt_ids("And now?"),
        format_prompt(tok, "And now?", system="Be brief.", history=session.history))
    session.reset()
    np.testing.assert_array_equal(session.prompt_ids("Hi there"), format_prompt(tok, "Hi there", system="Be brief."))
    assert "".join(session.reply("Hi there")) == first
    # A long conversation keeps only the newest exchanges that fit beside the reply.
    session.history = [{"role": r, "content": "word " * 20} for r in ("user", "assistant") * 6]
    ids = session.prompt_ids("last")
    assert len(ids) <= session.room and ids[-1] == tok.assistant_id
    with pytest.raises(ValueError, match="at most"):
        session.prompt_ids("word " * 200)


def test_bad_inputs_name_the_problem(tok, run_dir, tmp_path):
    _, cfg, params = run_dir
    with pytest.raises(FileNotFoundError, match="no such directory"):
        lm.load(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="vocab_size"):
        chat.ChatSession(cfg.replace(vocab_size=100), params, tok)
    with pytest.raises(ValueError, match="max_len"):
        chat.ChatSession(cfg, params, tok, max_new_tokens=cfg.max_len)
    assert lm.load(str(run_dir[0] / "checkpoints"))[2].path == str(run_dir[0] / "tokenizer.model")
    p = _chat([f"--checkpoint={run_dir[0] / 'checkpoints'}", "--tokenizer=/no/such.model"], "")
    assert p.returncode == 2 and "/no/such.model" in p.stderr, p.stderr[-2000:]


def _chat(args, stdin):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "experiments.chat", *args], input=stdin, capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=120)


def _replies(stdout):
    return [line.split("assistant> ", 1)[1] for line in stdout.splitlines() if "assistant> " in line]


def test_scripted_session_over_stdin(run_dir):
    run, _, _ = run_dir
    script = "Hello\nWhat is the capital of France?\n\n/reset\nHello\n/exit\nnever read\n"
    p = _chat([f"--checkpoint={run}", "--temperature=0", "--max_new_tokens=12", "--chunk=4", "--stats"], script)
    assert p.returncode == 0, p.stderr[-3000:]
    replies = _replies(p.stdout)
    assert len(replies) == 3, p.stdout
    assert "(conversation cleared)" in p.stdout
    assert replies[2] == replies[0]  # greedy, and /reset brought back the same prompt
    counts = [int(n) for n in re.findall(r"\[(\d+) tokens in", p.stderr)]
    assert len(counts) == 3 and all(0 <= n <= 12 for n in counts)
    assert "never read" not in p.stdout


def test_load_reads_run_ppo_reward_and_hf_directories(run_dir, tmp_path):
    run, cfg, params = run_dir
    hf.save(cfg, params, tmp_path / "hf")
    critic = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_params(cfg, "scalar"))
    _save(tmp_path / "ppo", {"actor": params, "critic": critic},
          {"model": cfg.to_dict(), "stage": "ppo", "params": {"actor": "lm", "critic": "scalar"}, "policy": "actor"})
    mesh = sharding.make_mesh((1, -1, 1))
    for path in (run, run / "checkpoints", tmp_path / "hf", tmp_path / "ppo"):
        got_cfg, got, _ = lm.load(str(path), mesh=mesh, rules=chat.CHAT_RULES, head="lm")
        assert got_cfg.to_dict() == {**cfg.to_dict(), **{k: got_cfg.to_dict()[k] for k in HF_UNSTORED}}
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(params))
        assert got["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
    got_cfg, got, got_tok = lm.load(str(run))  # no mesh: on the first device, with the run's tokenizer
    assert got["embed"]["embedding"].devices() == {jax.devices()[0]} and got_tok.vocab_size == cfg.vocab_size
    _save(tmp_path / "rm", critic, {"model": cfg.to_dict(), "stage": "reward", "head": "scalar"})
    with pytest.raises(ValueError, match="reward model"):
        lm.load(str(tmp_path / "rm"), mesh=mesh, head="lm")
    _, rm, _ = lm.load(str(tmp_path / "rm"))
    assert "score" in rm and "lm_head" not in rm
    # A config that computes another function (same shapes) is refused, naming the field.
    with pytest.raises(ValueError, match="position: 'rope' there, 'alibi' here"):
        lm.load(str(run), cfg=cfg.replace(position="alibi"))
    assert lm.load(str(run), cfg=cfg.replace(dtype="bfloat16"))[0].dtype == "bfloat16"


def test_repl_commands_and_end_of_input(tok, run_dir):
    _, cfg, params = run_dir
    session = chat.ChatSession(cfg, params, tok, temperature=0.0, max_new_tokens=8, chunk=4)
    out = io.StringIO()
    chat.repl(session, io.StringIO("Hi there\n\n/reset\nHi there\n"), out)  # no /exit: input just ends
    replies = _replies(out.getvalue())
    assert len(replies) == 2 and replies[0] == replies[1]
    assert out.getvalue().count("you> ") == 5 and out.getvalue().endswith("you> \n")
    assert len(session.history) == 2
