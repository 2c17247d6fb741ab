"""Fine-tune a pretrained model as a classifier, GPT-1 style (a linear head on the last token): lm.stages.classify.

  python -m experiments.classify --config=configs/classify.py:tiny --workdir=runs/classify \
      --config.init_from=runs/pretrain [--config.data.path=LABELLED.jsonl] [--config.classify.aux_lm_coef=0.5]

Rows are `{"text", "label"}` or sentence pairs `{"text", "text_pair", "label"}` (`--config.data.field_map` renames
other columns, e.g. "sentence1=text,sentence2=text_pair"); the held-out accuracy is logged as `eval_accuracy`.
Rerunning resumes from WORKDIR; `python -m experiments.export --run=WORKDIR --out=DIR` writes the classifier as a
`*ForSequenceClassification` with the run's class names.
"""
import experiments
from lm import stages

if __name__ == "__main__":
    experiments.main(stages.classify, "configs/classify.py:tiny")
