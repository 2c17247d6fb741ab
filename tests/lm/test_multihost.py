"""A real two-process run (jax.distributed on localhost, CPU collectives) trains exactly like one process."""
import os
import socket
import subprocess
import sys

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from configs import pretrain
from lm import checkpoint, distributed, loop, losses, presets
from lm.config import ModelConfig
from lm.logging_utils import read_metrics
from lm.model import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = presets.get("llama-tiny", vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)

# A worker process: 2 CPU devices of its own, then the same `train` as the single-process reference.
WORKER = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, {tests!r})
import test_multihost
test_multihost.train(sys.argv[1], coordinator=sys.argv[2], num_processes=2, process_id=int(sys.argv[3]))
"""


def train(workdir, coordinator="", num_processes=0, process_id=-1):
    """Five steps of a tiny LM; each process loads only its block of rows of every global batch."""
    config = pretrain.get_config("tiny")
    config.distributed.update(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    distributed.initialize(config.distributed)
    # A different mesh in each case: (1, 4, 1) over two processes, (2, 4, 1) in one.
    config.mesh.shape = (-1, 4, 1)
    config.train.update(steps=5, batch_size=8, log_every=1, eval_every=0)
    config.checkpoint.every_steps = 2
    model = Transformer(CFG)
    rs = np.random.RandomState(0)
    n, p = 8 // jax.process_count(), jax.process_index()
    rows = []
    for _ in range(5):
        inputs = rs.randint(0, 128, (8, 16)).astype(np.int32)
        batch = {"inputs": inputs, "targets": (inputs * 3 + 1) % 128,
                 "loss_mask": (rs.rand(8, 16) > 0.2).astype(np.float32)}
        rows.append({k: v[p * n:(p + 1) * n] for k, v in batch.items()})

    def numpy_params(abstract):
        r = np.random.RandomState(1)
        return jax.tree.map(lambda a: (0.02 * r.randn(*a.shape) + (a.ndim == 1)).astype(a.dtype), abstract)

    loop.fit(config, workdir, loss_fn=losses.lm_loss_fn(model),
                build_params=lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"],
                train_data=grain.MapDataset.source(rows).to_iter_dataset(), init_params=numpy_params,
                meta={"model": CFG.to_dict()})
    print("devices", jax.device_count(), "local", jax.local_device_count())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=os.path.dirname(os.path.abspath(__file__))))
    two = str(tmp_path / "two")
    address = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, PYTHONPATH=ROOT)
    logs = [open(tmp_path / f"worker{i}.log", "w") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(script), two, address, str(i)], cwd=ROOT, env=env,
                              stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)]
    one = str(tmp_path / "one")
    train(one)  # the single-process reference, here, while the workers run
    for p, log in zip(procs, logs):
        p.wait(timeout=600)
        text = open(log.name).read()
        assert p.returncode == 0, text[-3000:]
        assert "devices 4 local 2" in text

    a, b = read_metrics(os.path.join(one, "metrics.jsonl")), read_metrics(os.path.join(two, "metrics.jsonl"))
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], atol=1e-5, rtol=0)
    assert b[-1]["loss"] < b[0]["loss"]
    # The checkpoint was written by both processes together: one data-position file each, shared arrays.
    ckpt = os.path.join(two, "checkpoints")
    assert checkpoint.latest_step(ckpt) == 5
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(os.path.join(ckpt, "5", "data")))
    cfg = ModelConfig.from_dict(checkpoint.load_meta(ckpt)["model"])
    abstract = nn.unbox(jax.eval_shape(lambda r: Transformer(cfg).init(r, jnp.zeros((1, 8), jnp.int32))["params"],
                                       jax.random.PRNGKey(0)))
    p1 = jax.device_get(checkpoint.load_params(os.path.join(one, "checkpoints"), abstract))
    p2 = jax.device_get(checkpoint.load_params(ckpt, abstract))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), p1, p2)
