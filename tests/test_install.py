"""What `pip install -e .` installs is everything a research script imports, from any directory; `import lm`
stays light (flax, orbax, grain and tfds load when first used; the optional lm-eval only with lm.eval_harness)."""
import subprocess
import sys

SCRIPT = """
import sys
import lm, rl
heavy = sorted(m for m in ("flax", "orbax", "grain", "tensorflow_datasets", "optax", "lm_eval") if m in sys.modules)
assert not heavy, f"import lm pulled in {heavy}"
import configs.pipeline, experiments.pipeline, experiments.qa_task
from lm import stages, loop, runs
from rl import evaluate, stages as rl_stages
assert callable(lm.load) and callable(lm.generate) and lm.generation.__name__ == "lm.generation"
assert {"pretrain", "sft"} <= set(dir(stages)) and {"reward", "ppo", "dpo"} <= set(dir(rl_stages))
print("ok", configs.pipeline.get_config("tiny").ppo.ppo.kl_coef)
"""


def test_installed_packages_import_outside_the_checkout(tmp_path):
    p = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == ["ok", "0.05"]
