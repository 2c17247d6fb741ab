"""A real two-process run (jax.distributed on localhost, CPU collectives) trains exactly like one process."""
import os
import signal
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
from lm import loop
try:
    test_multihost.train(sys.argv[1], coordinator=sys.argv[2], num_processes=2, process_id=int(sys.argv[3]),
                         steps=int(sys.argv[4]), sigterm=sys.argv[5] == "sigterm")
except loop.Preempted as e:
    print(e, flush=True)
    sys.exit(143)
"""


def train(workdir, coordinator="", num_processes=0, process_id=-1, steps=5, sigterm=False):
    """`steps` steps of a tiny LM; each process loads only its block of rows of every global batch.

    sigterm: process 1 sends itself SIGTERM while its data is read (a preemption notice to one host).
    """
    config = pretrain.get_config("tiny")
    config.distributed.update(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    distributed.initialize(config.distributed)
    # A different mesh in each case: (1, 4, 1) over two processes, (2, 4, 1) in one.
    config.mesh.shape = (-1, 4, 1)
    config.train.update(steps=steps, batch_size=8, log_every=1, eval_every=0)
    config.checkpoint.every_steps = 2
    model = Transformer(CFG)
    rs = np.random.RandomState(0)
    n, p = 8 // jax.process_count(), jax.process_index()
    rows = []
    for _ in range(steps):
        inputs = rs.randint(0, 128, (8, 16)).astype(np.int32)
        batch = {"inputs": inputs, "targets": (inputs * 3 + 1) % 128,
                 "loss_mask": (rs.rand(8, 16) > 0.2).astype(np.float32)}
        rows.append({k: v[p * n:(p + 1) * n] for k, v in batch.items()})

    def numpy_params(abstract):
        r = np.random.RandomState(1)
        return jax.tree.map(lambda a: (0.02 * r.randn(*a.shape) + (a.ndim == 1)).astype(a.dtype), abstract)

    def read(i):
        if sigterm and p == 1 and i == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return rows[i]

    loop.fit(config, workdir, loss_fn=losses.lm_loss_fn(model),
             build_params=lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"],
             train_data=grain.MapDataset.range(steps).map(read).to_iter_dataset(), init_params=numpy_params,
             meta={"model": CFG.to_dict()})
    print("devices", jax.device_count(), "local", jax.local_device_count())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workers(tmp_path, workdir, steps, mode="run"):
    """Start the two worker processes of one run; returns them with their log paths."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=os.path.dirname(os.path.abspath(__file__))))
    address = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, PYTHONPATH=ROOT)
    logs = [str(tmp_path / f"{os.path.basename(workdir)}-{mode}-{i}.log") for i in range(2)]
    return [(subprocess.Popen([sys.executable, str(script), workdir, address, str(i), str(steps), mode], cwd=ROOT,
                              env=env, stdout=open(logs[i], "w"), stderr=subprocess.STDOUT), logs[i])
            for i in range(2)]


def _wait(workers, returncode=0):
    texts = []
    for p, log in workers:
        p.wait(timeout=600)
        texts.append(open(log).read())
        assert p.returncode == returncode, texts[-1][-3000:]
    return texts


def test_two_processes_match_one_process(tmp_path):
    two = str(tmp_path / "two")
    workers = _workers(tmp_path, two, 5)
    one = str(tmp_path / "one")
    train(one)  # the single-process reference, here, while the workers run
    assert all("devices 4 local 2" in text for text in _wait(workers))

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


def test_sigterm_to_one_host_saves_one_step_on_both_and_the_rerun_matches_one_process(tmp_path):
    steps, two = 8, str(tmp_path / "two")
    workers = _workers(tmp_path, two, steps, "sigterm")
    one = str(tmp_path / "one")
    train(one, steps=steps)
    texts = _wait(workers, returncode=143)
    # JAX's preemption sync point gives every host the same step to save at; orbax writes it collectively.
    saved = checkpoint.latest_step(os.path.join(two, "checkpoints"))
    assert 0 < saved < steps and all(f"preempted: saved step {saved}" in t for t in texts), texts
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(
        os.listdir(os.path.join(two, "checkpoints", str(saved), "data")))
    _wait(_workers(tmp_path, two, steps))  # the same command again, no signal: resumes at `saved`
    a, b = read_metrics(os.path.join(one, "metrics.jsonl")), read_metrics(os.path.join(two, "metrics.jsonl"))
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], atol=1e-5, rtol=0)
