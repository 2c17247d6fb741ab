"""Configs and launchers: presets, command-line overrides, clear errors, and real-size steps traced abstractly."""
import functools
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from absl import flags
from ml_collections import config_flags

import experiments
from configs import classify, pretrain, sft
from lm import loop, losses, optim, presets, runs, sharding, train_step
from lm.model import Transformer, boxed_params

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse(*args):
    """Parse launcher-style flags into a fresh flag set; returns the config."""
    fv, argv = flags.FlagValues(), ["prog", *args]
    # Override flags are declared from the argument list, as `python -m experiments.X ...` does from sys.argv.
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


@pytest.mark.parametrize("module", [pretrain, sft, classify])
def test_every_preset_builds_a_valid_model(module):
    for preset in module.PRESETS:
        config = module.get_config(preset)
        cfg = runs.model_config(config)
        assert cfg.vocab_size >= config.data.get("vocab_size", 0)
        assert config.train.batch_size % config.train.micro_batches == 0
    with pytest.raises(ValueError, match=r"unknown .* preset 'huge'; choose one of \("):
        module.get_config("huge")


def test_every_config_field_has_a_comment():
    for name in ("common.py", "pretrain.py", "sft.py", "classify.py"):
        with open(os.path.join(ROOT, "configs", name)) as f:
            for i, line in enumerate(f, 1):
                if re.match(r"\s*c(\.\w+)+ = ", line):
                    assert "#" in line, f"configs/{name}:{i} has no comment: {line.strip()}"


def test_command_line_overrides_reach_the_model_and_mesh():
    config = parse("--config=configs/pretrain.py:tiny", "--config.model.overrides.n_layers=3",
                   "--config.model.overrides.dtype=bfloat16", "--config.mesh.shape=(2,2,2)",
                   "--config.train.log_every=1", "--config.data.path=/my/text", "--config.mesh.rules.embed=")
    cfg = runs.model_config(config)
    assert (cfg.n_layers, cfg.dtype, cfg.d_model) == (3, "bfloat16", presets.get("llama-tiny").d_model)
    assert tuple(config.mesh.shape) == (2, 2, 2) and config.train.log_every == 1
    assert config.data.path == "/my/text"
    assert dict(sharding.rules_from_config(config.mesh.rules))["embed"] is None
    mesh, _ = loop.mesh_and_rules(config)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    # With init_from, the saved model config is the base; overrides of how it runs apply, and an override that
    # changes what it computes is refused, naming the field (a RoPE model run with ALiBi has the same shapes).
    base = presets.get("glm-tiny", n_layers=3, vocab_size=2048).to_dict()
    assert runs.model_config(config, base).position == "rope2d"
    assert runs.model_config(config, base).dtype == "bfloat16"
    with pytest.raises(ValueError, match="n_layers: 2 there, 3 here"):
        runs.model_config(config, presets.get("glm-tiny", vocab_size=2048).to_dict())
    config = parse("--config=configs/sft.py:tiny", "--config.init_from=runs/pt", "--config.model.overrides.position=alibi")
    with pytest.raises(ValueError, match=r"init_from run runs/pt .*\n  position: 'rope' there, 'alibi' here"):
        runs.model_config(config, presets.get("llama-tiny", vocab_size=2048).to_dict())


def test_unknown_config_keys_are_named():
    config = pretrain.get_config("tiny")
    msg = experiments._unknown_override(config, ["prog", "--config.train.stepz=3"])
    assert "unknown config key 'train.stepz'" in msg and "train has no field 'stepz'" in msg and "steps" in msg
    msg = experiments._unknown_override(config, ["prog", "--config.model.overrides.n_layerz=3"])
    assert "model.overrides has no field 'n_layerz'" in msg and "n_layers" in msg
    assert experiments._unknown_override(config, ["prog", "--config.train.steps=3", "--workdir=x"]) is None
    proc = subprocess.run([sys.executable, "-m", "experiments.pretrain", "--config=configs/pretrain.py:tiny",
                           "--workdir=/tmp/unused", "--config.optim.lrr=1"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert "error: unknown config key 'optim.lrr' in '--config.optim.lrr=1': optim has no field 'lrr'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_launcher_reports_a_bad_init_from_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.dpo", "--config=configs/dpo.py:tiny",
                           f"--workdir={tmp_path / 'run'}", f"--config.init_from={tmp_path / 'no_run'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"error: no checkpoint directory at {tmp_path / 'no_run'}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_paths_and_vocab_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path /no/such/dir does not exist"):
        runs.text_files("/no/such/dir")
    with pytest.raises(FileNotFoundError, match="holds no .txt files"):
        runs.text_files(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tokenizer path .*missing.model does not exist"):
        runs.run_tokenizer(str(tmp_path / "run"), str(tmp_path / "missing.model"))

    class Tok:
        path, vocab_size = "tok.model", 4000
    with pytest.raises(ValueError, match=r"4000 ids but the model's vocab_size is 2048; set "
                                         r"--config.model.overrides.vocab_size=4000"):
        runs.check_vocab(Tok, runs.model_config(pretrain.get_config("tiny")))


@pytest.mark.parametrize("preset", ["llama-7b", "bloom-7b1", "glm-6b"])
def test_real_size_train_steps_trace_on_a_mesh(preset):
    """The full sharded step of each real preset lowers on 8 fake devices (nothing is allocated)."""
    config = pretrain.get_config(preset)
    cfg = runs.model_config(config)
    mesh, rules = loop.mesh_and_rules(config)
    tx, lr = optim.make_optimizer(config.optim, config.train.steps)
    abstract, shardings = train_step.state_shardings(functools.partial(boxed_params, cfg), tx, mesh, rules)
    q = shardings.params["layers"]["attn"]["q"]["kernel"]
    assert q.spec[1] == "fsdp"  # [layers, embed, heads, head_dim]: embed split over the 8 fsdp devices
    b, t = 16, config.data.seq_len
    batch = {"inputs": jax.ShapeDtypeStruct((b, t), jnp.int32), "targets": jax.ShapeDtypeStruct((b, t), jnp.int32),
             "loss_mask": jax.ShapeDtypeStruct((b, t), jnp.float32)}
    if config.data.objective == "glm":
        batch.update(positions=jax.ShapeDtypeStruct((b, t, 2), jnp.int32),
                     prefix_len=jax.ShapeDtypeStruct((b,), jnp.int32))
    step = train_step.make_train_step(losses.lm_loss_fn(Transformer(cfg)), tx, shardings, mesh, rules=rules,
                                 lr_schedule=lr)
    text = step.lower(abstract, batch).as_text()
    assert "bf16" in text
