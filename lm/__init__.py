"""Decoder language models in JAX/Flax: one Transformer for LLaMA, BLOOM, GLM, Baichuan and GPT.

Public API (`lm.X`): `ModelConfig` and `presets` (architectures); `Transformer`, `init_params`,
`boxed_params`, `abstract_params`, `init_cache`, `count_params`, `default_positions` (the model, with an LM,
a score head or both: reward models and classifiers);
`generate` and `stream` (KV-cache sampling); `embed` (texts as pooled hidden states; `embedding.zero_shot`);
`fewshot` (k-shot prompts, log-likelihood and multiple-choice scoring; `lm.eval_harness`, imported explicitly,
runs lm-eval's task suites and needs the optional `eval` extra); `load` (any run directory or Hugging
Face directory -> `(config, params, tokenizer)`); `quantize` (weight-only
int8/int4/NF4); `peft` (LoRA, QLoRA, prompt and prefix tuning), `quant`, `hf_adapter` (PEFT adapter
directories); `stages` (`pretrain`, `sft`, `classify` as `(config, workdir)` functions; `classify` the
GPT-1 classification recipe); `loop` (the one training loop);
`hf` (checkpoints in and out); `tokenizer` (`tokenizer.load(path)`: any checkpoint's tokenizer, backends in
`tokenizers`); `data`; `kernels`. Submodules load on first use, so `import lm` costs little more than
`import jax`.

How the code is layered (see also docs/architecture.md):
  lm.config / lm.presets / lm.model / lm.kernels   the model: one Transformer, families as presets
  lm.generation, lm.sampling                       KV-cache decoding
  lm.train_step (a step) / lm.loop (the loop)      `state, metrics = step(state, batch)`, and the one loop
                                                   that runs any step: resume, logging, eval, checkpoints,
                                                   non-finite streak, preemption
  lm.checkpoint, lm.runs                           orbax checkpoints of any state; run directories and `load`
  lm.stages                                        pretrain, SFT and classification as library functions
  rl (on top of lm)                                reward model, PPO, DPO, the critic-free RL methods:
                                                   pure math + one RL trainer + stages
  experiments (on top of both)                     launchers (flags -> one stage call), the demo pipeline
"""
from lm import _lazy
from lm.config import ModelConfig

_ATTRS = {
    "Transformer": "lm.model", "count_params": "lm.model", "default_positions": "lm.model",
    "init_cache": "lm.model", "init_params": "lm.model", "boxed_params": "lm.model",
    "abstract_params": "lm.model", "generate": "lm.generation", "stream": "lm.generation", "load": "lm.runs",
    "quantize": "lm.peft", "embed": "lm.embedding",
}
_MODULES = ("checkpoint", "classify", "data", "distributed", "embedding", "fewshot", "generation", "hf", "hf_adapter",
            "kernels", "logging_utils", "loop", "losses", "model", "optim", "peft", "presets", "quant", "runs",
            "sampling", "sharding", "stages", "tokenizer", "tokenizers", "train_step")

__all__ = ["ModelConfig", *sorted(_ATTRS), *_MODULES]
__getattr__, __dir__ = _lazy.attributes(__name__, _ATTRS, _MODULES)
