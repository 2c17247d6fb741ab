"""The Colab notebooks: stored clean (nbformat v4, no outputs, one `parameters` cell), and each one runs headless
on CPU as shipped, at its default parameters, as a user runs it (only the pipeline's WORKDIR is moved to a
temporary directory, papermill-style: a cell injected after the `parameters` cell)."""
import json
import math
import os
import re

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ("quickstart", "rlhf_pipeline", "tpu_sharding")
KERNEL = "chatgpt-jax-tests"


def _load(name):
    return nbformat.read(os.path.join(ROOT, "colab", f"{name}.ipynb"), as_version=4)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_clean(name):
    nb = _load(name)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    code = [c for c in nb.cells if c.cell_type == "code"]
    for c in code:
        assert c.outputs == [] and c.execution_count is None, f"{name}: stored outputs in {c.source[:60]!r}"
    tagged = [i for i, c in enumerate(code) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: expected one code cell tagged 'parameters', found {len(tagged)}"
    # The install cell comes first; the parameter cell holds plain assignments only.
    assert "pip install" in code[0].source and tagged[0] == 1
    for line in code[1].source.splitlines():
        assert not line or line.startswith("#") or re.match(r"^[A-Z_0-9]+ = ", line), line


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory):
    """A kernelspec for this very interpreter in a temporary prefix (nothing is installed for the user)."""
    from ipykernel.kernelspec import install
    prefix = tmp_path_factory.mktemp("kernels")
    install(kernel_name=KERNEL, prefix=str(prefix))
    return KernelSpecManager(kernel_dirs=[str(prefix / "share" / "jupyter" / "kernels")])


def run_notebook(name, params, kernel_specs, timeout=600):
    """Execute `colab/NAME.ipynb` from the repository root with `params` injected; returns the notebook."""
    nb = _load(name)
    i = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    injected = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb.cells.insert(i + 1, nbformat.v4.new_code_cell(injected, metadata={"tags": ["injected-parameters"]}))
    km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=kernel_specs)
    NotebookClient(nb, km=km, timeout=timeout, resources={"metadata": {"path": ROOT}}).execute()
    if os.environ.get("NOTEBOOK_OUTPUT_DIR"):  # keep the executed notebook for a look
        nbformat.write(nb, os.path.join(os.environ["NOTEBOOK_OUTPUT_DIR"], f"{name}.ipynb"))
    return nb


def _defaults(name):
    """The notebook's shipped parameter values (its `parameters` cell, executed)."""
    cell = next(c for c in _load(name).cells if "parameters" in c.metadata.get("tags", []))
    values = {}
    exec(cell.source, {}, values)
    return values


def _text(nb):
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.output_type == "stream")


def _figures(nb):
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def _numbers(pattern, text):
    """Every match of `pattern` in `text` as floats (a tuple per match when it has several groups)."""
    found = re.findall(pattern, text)
    return [tuple(map(float, m)) if isinstance(m, tuple) else float(m) for m in found]


@pytest.fixture
def cpu_env(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


def test_quickstart_runs_as_shipped(kernel_specs, cpu_env):
    from lm import count_params, presets
    shipped = _defaults("quickstart")
    nb = run_notebook("quickstart", {}, kernel_specs)
    text = _text(nb)
    assert f"parameters: {count_params(presets.get(shipped['PRESET'])):,}" in text
    # Published sizes: LLaMA-7B 6.74B (Touvron et al. 2023), GPT-2 small 124M.
    assert _numbers(r"llama-7b +([\d.]+)B", text) == [pytest.approx(6.74, abs=0.005)]
    assert _numbers(r"gpt2-124m +([\d.]+)B", text) == [pytest.approx(0.124, abs=0.0005)]
    assert "8 devices" in text and "'fsdp': 4, 'tensor': 2" in text
    [(total, per_token)] = _numbers(r"log-prob of the generated text: (-?[\d.]+) \((-?[\d.]+) per token", text)
    assert total < 0 and math.isclose(total / shipped["MAX_NEW_TOKENS"], per_token, rel_tol=1e-2, abs_tol=1e-3)
    assert _numbers(r"max abs difference ([\d.e+-]+)", text)[0] < 1e-4
    assert _figures(nb) >= 1


def test_tpu_sharding_as_shipped_falls_back_to_fake_cpu_devices_and_trains(kernel_specs, cpu_env):
    shipped = _defaults("tpu_sharding")
    nb = run_notebook("tpu_sharding", {}, kernel_specs)
    text = _text(nb)
    assert f"training {shipped['CPU_PRESET']} on 8 fake CPU devices" in text
    assert "mesh: {'data': 1, 'fsdp': 4, 'tensor': 2}" in text
    losses = _numbers(r"step +\d+  loss ([\d.]+)", text)
    assert len(losses) == shipped["STEPS"] and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert "tokens/s" in text and _figures(nb) >= 1


def test_tpu_sharding_on_another_mesh(kernel_specs, cpu_env):
    params = {"STEPS": 3, "CPU_BATCH_SIZE": 8, "CPU_SEQ_LEN": 32, "MESH_SHAPE": (2, 2, 2)}
    text = _text(run_notebook("tpu_sharding", params, kernel_specs))
    assert "mesh: {'data': 2, 'fsdp': 2, 'tensor': 2}" in text
    assert len(_numbers(r"step +\d+  loss ([\d.]+)", text)) == 3


def test_rlhf_pipeline_runs_every_stage_as_shipped(kernel_specs, cpu_env, tmp_path):
    assert _defaults("rlhf_pipeline")["QUICK"] is True and _defaults("rlhf_pipeline")["STEPS"] == {}
    # One RL method beside PPO and DPO (they share one trainer; tests/rl runs each) keeps the run short.
    nb = run_notebook("rlhf_pipeline", {"WORKDIR": str(tmp_path / "pipeline"), "METHODS": "grpo"}, kernel_specs)
    text = _text(nb)
    assert "pretrain     6 steps, batch 8" in text and "'n_layers': 1" in text
    finals = dict(re.findall(r"(\w+) +final loss ([\d.]+)", text))
    assert sorted(finals) == ["dpo", "pretrain", "reward", "sft"]
    assert all(math.isfinite(float(v)) for v in finals.values())
    # A few steps of a one-layer model may leave every held-out prompt's samples tied (all wrong): then there
    # is no held-out pair, and the accuracy is NaN rather than a made-up number.
    [(accuracy, pairs)] = _numbers(r"reward model held-out accuracy (nan|[\d.]+) on (\d+) pairs", text)
    assert 0.0 <= accuracy <= 1.0 if pairs else math.isnan(accuracy)
    for name in ("PPO", "GRPO"):
        [(score0, score1, kl, gold0, gold1)] = _numbers(
            name + r" score (-?[\d.]+) -> (-?[\d.]+), KL (-?[\d.]+), gold ([\d.]+) -> ([\d.]+)", text)
        assert all(math.isfinite(x) for x in (score0, score1, kl)) and 0 <= gold0 <= 1 and 0 <= gold1 <= 1
        [(gold, stderr, win_rate)] = _numbers(r"\n  " + name + r" +([\d.]+) \+- ([\d.]+) +([\d.]+) ", text)
        assert 0.0 <= gold <= 1.0 and 0.0 <= win_rate <= 1.0
    assert "== SFT" in text and "== PPO" in text and text.count("\nQ: ") >= 8
    assert _figures(nb) >= 3
    with open(tmp_path / "pipeline" / "report.json") as f:
        rm = json.load(f)["reward_model"]
    assert rm["heldout_pairs"] == pairs
    assert rm["heldout_accuracy"] == pytest.approx(accuracy, abs=1e-3, nan_ok=True)
