"""Export a run's model and tokenizer as a Hugging Face directory: lm.hf.export_run.

  python -m experiments.export --run=runs/sft --out=hf/sft [--architecture=LlamaForCausalLM] [--dtype=bfloat16]
  python -m experiments.export --run=runs/sft_lora --out=hf/sft_lora --adapter

A run of adapters (`--config.peft.method=...`) is exported merged; with `--adapter`, the model it adapted goes
to OUT and its adapters, in PEFT's format, to OUT/adapter (`peft.PeftModel.from_pretrained(model, OUT/adapter)`).

A pretraining, SFT, DPO or PPO run gives its policy as a causal LM (`AutoModelForCausalLM`); a reward run gives
its raw reward model as the family's `*ForSequenceClassification` (`AutoModelForSequenceClassification`, one
label, scored at the last non-pad token: end a sequence at the chat template's end-of-turn token, where the
model was trained to score, not at the newline `apply_chat_template` may add after it), with the run's
`reward_norm.json` beside: `(score - mean) / std` is the normalised reward the RL stages use. The tokenizer
is written for `AutoTokenizer`, chat template included. A classification run (`experiments.classify`) gives its
classifier the same way, with `num_labels` its classes and their names as `id2label` / `label2id`.
"""
from absl import flags

import experiments

_RUN = flags.DEFINE_string("run", None, "Run directory (or its checkpoints/) of any stage.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory for the Hugging Face files.", required=True)
_ARCH = flags.DEFINE_string("architecture", None, "HF architecture name; default: the one the model config implies.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["bfloat16", "float32"],
                           "Weight dtype; default: the checkpoint's (runs train in float32).")
_ADAPTER = flags.DEFINE_bool("adapter", False, "For a run of adapters: the base model to OUT and the PEFT adapter "
                             "to OUT/adapter instead of merged weights.")


def main(argv):
    del argv
    from lm import hf

    out = hf.export_run(_RUN.value, _OUT.value, architecture=_ARCH.value, dtype=_DTYPE.value, adapter=_ADAPTER.value)
    print(f"wrote {out}")


if __name__ == "__main__":
    experiments.run(main)
