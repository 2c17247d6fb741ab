"""Test setup: 8 fake CPU devices (set before jax is imported) and float32 matmuls at full precision."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
flags = os.environ["XLA_FLAGS"]
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = flags + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The files that take longest on 2 cores (`pytest --durations`, 2026-12), slowest first. `make test` hands files
# to its two workers in collection order (`--no-loadscope-reorder`), so starting with these lets both workers
# finish together instead of one running a long file alone at the end.
SLOW_FILES = ("rl/test_ppo_resume.py", "test_families.py", "rl/test_algorithms.py", "test_notebooks.py", "test_peft_stages.py", "lm/kernels/test_kernels_model.py",
              "lm/test_multihost.py", "test_hf_start.py", "lm/test_checkpoint.py", "rl/test_ppo_step.py",
              "test_pipeline.py", "rl/test_reward_dpo_train.py", "lm/test_sharding.py", "lm/test_peft_train.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    here = os.path.dirname(os.path.abspath(__file__))
    items.sort(key=lambda item: rank.get(os.path.relpath(str(item.path), here), len(rank)))
