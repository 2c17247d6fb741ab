"""lm-evaluation-harness (lm-eval 0.4.13) runs its task suites (MMLU, C-Eval, HellaSwag, ...) on any model `lm.load`
reads: a run directory of any stage or a Hugging Face directory.

  import lm.eval_harness  # registers the model "lm-jax"
  lm_eval.simple_evaluate(model="lm-jax", model_args="pretrained=RUN_OR_HF_DIR,batch_size=8", tasks=["mmlu"])
  lm_eval.simple_evaluate(model=lm.eval_harness.JaxLM(cfg=cfg, params=params, tokenizer=tok), tasks=[...])

or `python -m experiments.lm_eval --checkpoint=DIR --tasks=mmlu`. The harness's own CLI finds the model once
this module is imported (it has no plugin discovery):
  python -c "import lm.eval_harness; from lm_eval.__main__ import cli_evaluate; cli_evaluate()" \\
      --model lm-jax --model_args pretrained=DIR,batch_size=8 --tasks mmlu

Tokenisation follows the harness's Hugging Face model (`TemplateLM`, which this class extends): a context and
its continuation are encoded whole and split where the context's own encoding ends, trailing spaces of the
context moving to the continuation; an empty context becomes the prefix token (BOS, or EOS for tokenizers
without one). A text starts with BOS whenever the tokenizer has one, as every stage of this project trains
(lm.data.pipelines). Rows longer than the model reads lose tokens from the left; scoring is
`lm.fewshot.loglikelihood_tokens` and generation `lm.generate`.

lm-eval is optional (the `eval` extra): `import lm` never imports it, and importing this module without it
raises an ImportError saying what to install.
"""
from __future__ import annotations

import json
from typing import Optional

from absl import logging

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    # Importing lm_eval.models registers the harness's own models, which ours would otherwise hide from get_model.
    from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:
    raise ImportError("lm.eval_harness needs lm-eval: pip install 'chatgpt-jax[eval]' (or lm_eval==0.4.13)") from e

from lm import fewshot, runs
from lm.generation import generate

NAME = "lm-jax"  # the harness's --model name
_GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")


@register_model(NAME)
class JaxLM(TemplateLM):
    """A model of this project behind lm-eval's `LM` interface (`loglikelihood`, `loglikelihood_rolling`,
    `generate_until`), on one process: params sit where `lm.load` puts them (the first local device)."""

    backend = "causal"

    def __init__(self, pretrained: Optional[str] = None, *, cfg=None, params=None, tokenizer=None,
                 batch_size: int | str = 8, max_gen_toks: int = 256, seed: int = 0, max_batch_size=None,
                 device=None, **unknown):
        """Either `pretrained` (a run directory or Hugging Face directory, read by `lm.load`; `tokenizer` may
        then be a path to another tokenizer) or `cfg`, `params` and `tokenizer` (a loaded model).

        batch_size: rows per forward pass or generation call. max_gen_toks: new tokens of a generation whose
        task sets none. seed: first PRNG seed of sampled generations (each call takes the next).
        max_batch_size, device: lm-eval's CLI passes them to every model; JAX places the model itself, and
        the batch size is fixed, so they are ignored.
        """
        super().__init__()
        if unknown:
            raise ValueError(f"{NAME}: unknown model_args {sorted(unknown)}; it takes pretrained, tokenizer, "
                             "batch_size, max_gen_toks, seed (and cfg, params from Python)")
        if (pretrained is None) == (cfg is None):
            raise ValueError(f"{NAME}: give either pretrained=DIR (a run or Hugging Face directory) or cfg, params "
                             "and tokenizer")
        if pretrained is not None:
            cfg, params, tokenizer = runs.load(str(pretrained), head="lm", tokenizer=tokenizer)
        if params is None or tokenizer is None:
            raise ValueError(f"{NAME}: the model needs its params and a tokenizer (a run without its own tokenizer "
                             "takes tokenizer=PATH)")
        if tokenizer.eos_id is None:
            raise ValueError(f"{NAME}: the tokenizer has no EOS token, which ends generations and stands in for an "
                             "empty context")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"{NAME}: batch_size must be a positive integer (there is no 'auto'), got {batch_size!r}")
        self.cfg, self.params, self.tokenizer = cfg, params, tokenizer
        self.batch_size, self.max_gen_toks, self._seed = int(batch_size), int(max_gen_toks), int(seed)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: Optional[dict] = None) -> "JaxLM":
        """The model from lm-eval's `model_args` dict; those win over the CLI's `--batch_size` / `--device`,
        which the CLI always passes (`--model_args batch_size=8` would otherwise be given twice)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> "JaxLM":
        """The model from `"pretrained=DIR,batch_size=8"`, as `create_from_arg_obj`."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @property
    def max_length(self) -> int:
        """Tokens one forward pass reads (lm.fewshot.max_input_length)."""
        return fewshot.max_input_length(self.cfg)

    @property
    def eot_token_id(self) -> int:
        """EOS: ends a generation (the harness asks for end of text, not of a sentence)."""
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context becomes, as in the harness's HF model: BOS, else EOS."""
        bos = self.tokenizer.bos_id
        return self.eot_token_id if bos is None else bos

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        """Token ids of `string`, after BOS unless `add_special_tokens` is False or the tokenizer has none."""
        bos = self.tokenizer.bos_id
        return ([] if add_special_tokens is False or bos is None else [bos]) + self.tokenizer.encode(string)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """`(log-prob, is greedy)` of each `((context, continuation) or None, context ids, continuation ids)`; a
        row longer than `max_length + 1` loses context tokens from the left, as in the harness's HF model."""
        pairs, cut = [], 0
        for strings, ctx, cont in requests:
            if len(cont) > self.max_length:
                raise ValueError(f"{NAME}: a continuation of {len(cont)} tokens cannot be scored by a model that "
                                 f"reads {self.max_length}: {strings!r}"[:500])
            row = (list(ctx) + list(cont))[-(self.max_length + 1):]
            cut += len(ctx) + len(cont) > len(row)
            pairs.append((row[:len(row) - len(cont)], cont))
        if cut:
            logging.warning("%s: %d of %d requests lost context tokens from the left (the model reads %d)", NAME,
                            cut, len(requests), self.max_length)
        ll, greedy = fewshot.loglikelihood_tokens(self.cfg, self.params, pairs, batch_size=self.batch_size)
        out = [(float(a), bool(b)) for a, b in zip(ll, greedy)]
        for (strings, _, _), answer in zip(requests, out):
            if strings is not None:  # rolling windows are cached per document by loglikelihood_rolling
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole document (`.args == (text,)`), every token predicted once, in windows
        of `max_length` (lm_eval.utils.get_rolling_token_windows, made disjoint as the harness's HF model does:
        a window after the first starts one token before those it predicts, the last as far back as fits). The
        document is encoded without BOS: the prefix token conditions its first token (the harness's HF model
        would also score a BOS it prepends)."""
        windows, owner = [], []
        for i, req in enumerate(requests):
            tokens = self.tok_encode(req.args[0], add_special_tokens=False)
            for ctx, pred in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, pred))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self._loglikelihood_tokens(windows) if windows else []):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """The text generated after each context (`.args == (context, gen_kwargs)`), cut before the first stop
        string of `gen_kwargs["until"]` and at EOS. Greedy unless `do_sample` with a temperature > 0; also
        `max_gen_toks`, `top_k`, `top_p`. The context keeps its last `max_length - max_gen_toks` tokens."""
        groups = {}  # one generation setting per distinct gen_kwargs
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out = [""] * len(requests)
        for indices in groups.values():
            gen_kwargs = requests[indices[0]].args[1]
            kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
            unknown = sorted(set(kwargs) - set(_GEN_KWARGS))
            if unknown:
                raise ValueError(f"{NAME}: generation settings {unknown} are not supported (it takes {_GEN_KWARGS})")
            n = kwargs["max_gen_toks"]
            room = self.max_length - n
            if room < 1:
                raise ValueError(f"{NAME}: max_gen_toks={n} leaves no room for a context in a model that reads "
                                 f"{self.max_length} tokens")
            prompts = {i: (self.tok_encode(requests[i].args[0]) or [self.prefix_token_id])[-room:] for i in indices}
            order = sorted(indices, key=lambda i: -len(prompts[i]))  # similar lengths share a padded width
            for lo in range(0, len(order), self.batch_size):
                batch = order[lo:lo + self.batch_size]
                new = generate(self.cfg, self.params, [prompts[i] for i in batch], n,
                               temperature=float(kwargs.get("temperature", 0.0)) if kwargs["do_sample"] else 0.0,
                               top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0),
                               eos_id=self.eot_token_id, seed=self._seed)
                self._seed += 1
                for i, tokens in zip(batch, new):
                    if tokens and tokens[-1] == self.eot_token_id:
                        tokens = tokens[:-1]
                    out[i] = postprocess_generated_text(self.tokenizer.decode(tokens), kwargs["until"], None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out
