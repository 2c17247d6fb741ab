"""Standard benchmark suites (MMLU, C-Eval, HellaSwag, ... any lm-evaluation-harness task) on a checkpoint:

  python -m experiments.lm_eval --checkpoint=RUN_OR_HF_DIR --tasks=mmlu,ceval-valid --num_fewshot=5 \\
      [--limit=N] [--batch_size=8] [--include_path=DIR [--noinclude_defaults]] [--out=results.json]

The checkpoint is read by `lm.load` and evaluated through lm.eval_harness (lm-eval's `simple_evaluate`); the
harness downloads each task's data from the Hugging Face Hub on first use (then `HF_DATASETS_OFFLINE=1` runs
from its cache), and `--include_path` adds task YAML files of your own. Prints the harness's results table and
writes the results as JSON with `--out`. Needs the `eval` extra (pip install 'chatgpt-jax[eval]').
"""
import json

from absl import flags

import experiments

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Run directory or Hugging Face directory (lm.load).",
                                  required=True)
_TASKS = flags.DEFINE_list("tasks", None, "lm-eval task or group names, e.g. mmlu,ceval-valid.", required=True)
_NUM_FEWSHOT = flags.DEFINE_integer("num_fewshot", None, "Demonstrations per prompt (default: each task's own).")
_LIMIT = flags.DEFINE_float("limit", None, "Examples per task: a count, or a fraction when below 1.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Rows per forward pass or generation call.")
_INCLUDE = flags.DEFINE_string("include_path", "", "A directory of extra task YAML files.")
_DEFAULTS = flags.DEFINE_boolean("include_defaults", True, "Index the harness's own tasks too (~5 s); "
                                 "--noinclude_defaults runs only those of --include_path.")
_OUT = flags.DEFINE_string("out", "", "Write the results (metrics per task, config) as JSON here.")


def main(argv):
    del argv
    from lm import eval_harness  # first: without lm-eval it raises the ImportError saying what to install

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable, make_table

    model = eval_harness.JaxLM(_CHECKPOINT.value, batch_size=_BATCH.value)
    tasks = TaskManager(include_path=_INCLUDE.value or None, include_defaults=_DEFAULTS.value)
    results = simple_evaluate(model=model, tasks=_TASKS.value, num_fewshot=_NUM_FEWSHOT.value, limit=_LIMIT.value,
                              log_samples=False, task_manager=tasks)
    results["config"]["model_args"] = {"pretrained": _CHECKPOINT.value, "batch_size": _BATCH.value}
    print(make_table(results), flush=True)
    if results.get("groups"):
        print(make_table(results, "groups"), flush=True)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(results, f, indent=1, default=handle_non_serializable)


if __name__ == "__main__":
    experiments.run(main)
