"""Few-shot (in-context) multiple choice on the QA task's held-out facts: GPT-3's k-shot prompting of any model.

  python -m experiments.fewshot --checkpoint=RUN_OR_HF_DIR[,RUN2,...] [--k=0,5] [--split=eval] [--choices=4]

Each question of `--split` (experiments.qa_task.data_files) becomes "Question: ...\\nAnswer:" after k solved
demonstrations drawn from the SFT facts (never the question asked), and the model picks the most likely of
`--choices` candidate answers of the question's relation (lm.fewshot.multiple_choice, lm-eval's `acc`).
Prints the accuracy per checkpoint and k beside chance, and writes them as JSON with `--out`.
"""
import json

from absl import flags

import experiments

_CHECKPOINT = flags.DEFINE_list("checkpoint", None, "Run directories or Hugging Face directories (lm.load).",
                                required=True)
_K = flags.DEFINE_list("k", ["0", "5"], "Demonstrations per prompt, one evaluation each.")
_SPLIT = flags.DEFINE_string("split", "eval", "The task's prompt set to ask (qa_task.data_files names).")
_CHOICES = flags.DEFINE_integer("choices", 4, "Candidate answers per question (the answer and others of its relation).")
_DATA_DIR = flags.DEFINE_string("data_dir", "data/qa", "The task's data (experiments.qa_task.write_data).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Rows per forward pass.")
_OUT = flags.DEFINE_string("out", "", "Write the accuracies as JSON here.")


def main(argv):
    del argv
    import lm
    from experiments import qa_task as qa
    from lm import fewshot

    task = qa.default_task()
    files = qa.data_files(_DATA_DIR.value)
    examples = qa.fewshot_examples(task, qa.read_prompts(files[_SPLIT.value]), _CHOICES.value)
    pool = qa.fewshot_pool(task, qa.read_prompts(files["sft"]))
    chance = sum(1 / len(ex.choices) for ex in examples) / len(examples)
    results = {}
    for path in _CHECKPOINT.value:
        cfg, params, tok = lm.load(path)
        for k in map(int, _K.value):
            prompts = fewshot.kshot_prompts(examples, pool, k)
            acc = fewshot.multiple_choice(cfg, params, tok, prompts, examples, batch_size=_BATCH.value)["accuracy"]
            results.setdefault(path, {})[f"{k}shot"] = acc
            print(f"{path}  {k}-shot multiple choice {acc:.3f}  ({len(examples)} questions, chance {chance:.3f})",
                  flush=True)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump({"questions": len(examples), "chance": chance, "accuracy": results}, f, indent=1)


if __name__ == "__main__":
    experiments.run(main)
