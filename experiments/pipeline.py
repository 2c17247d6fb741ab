"""The main job: the whole ChatGPT recipe, tiny, on the bundled QA task (rl.task), with measured results.

  python -m experiments.pipeline --config=configs/pipeline.py:tiny --workdir=DIR

Stages (each in `DIR/<stage>`; a stage whose `done.json` exists is skipped, a trainer stage interrupted
mid-run resumes from its checkpoint):
  tokenizer  BPE on the pretraining text and the SFT demonstrations.
  pretrain   causal LM on text stating every fact of the knowledge base.
  sft        demonstrations that mix complete, bare, evasive and wrong answers.
  samples    K responses per prompt from the SFT model, ranked by the labeler (rl.task.rank), which stands
             in for human labelers: preference data for training (`rl` prompts) and held-out (`rm_eval`).
  reward     reward model on the ranked samples (InstructGPT's K-wise loss).
  ppo, dpo   the SFT policy optimised against the reward model (PPO) and on the preferences (DPO).
  eval       reward-model held-out pairwise accuracy; the labeler's (gold) score of SFT, PPO and DPO on
             the held-out prompts; PPO-vs-SFT win rate; KL to the SFT reference; sample answers.
Writes `DIR/report.json`, `DIR/ppo_curves.png` and prints the results table.
"""
from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

import experiments
from lm import checkpoint, data, losses, sharding, trainer
from lm.config import ModelConfig
from lm.data.chat import format_prompt, format_response
from lm.generate import generate
from lm.model import Transformer
from lm.tokenizer import Tokenizer
from rl import dpo, ppo, ppo_loop, reward
from rl import task as qa

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file and preset, e.g. configs/pipeline.py:tiny.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory of the whole pipeline.", required=True)

STAGES = ("tokenizer", "pretrain", "sft", "samples", "reward", "ppo", "dpo", "eval")
DONE = "done.json"


# Stages ------------------------------------------------------------------------------------------------------

def _tokenizer(config, wd, files):
    corpus = os.path.join(wd, "sft_text.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        for line in open(files["sft"], encoding="utf-8"):
            row = json.loads(line)
            f.write(f"{row['prompt']}\n{row['response']}\n")
    Tokenizer.train(experiments.text_files(files["pretrain"]) + [corpus], config.tokenizer.vocab_size,
                    os.path.join(wd, "tokenizer"), seed=config.seed)
    return {}


def _fit_lm(c, wd, tok_path, dataset):
    """Pretraining or SFT: the body of experiments/pretrain.py and experiments/sft.py."""
    base_model, init_params = experiments.init_from(c)
    model_cfg = experiments.model_config(c, base_model)
    tok = experiments.run_tokenizer(wd, tok_path)
    experiments.check_vocab(tok, model_cfg)
    experiments.save_config(c, wd)
    state = trainer.fit(c, wd, loss_fn=losses.lm_loss_fn(Transformer(model_cfg)),
                        build_params=experiments.build_params(model_cfg), train_data=dataset(tok),
                        init_params=init_params, meta={"model": model_cfg.to_dict(), "config": c.to_dict()})
    return {"steps": int(state.step)}


def _pretrain(c, wd, tok_path):
    d = c.data
    kw = dict(experiments.data_kwargs(c), objective=d.objective, mask_ratio=d.mask_ratio,
              poisson_lambda=d.poisson_lambda, gmask_prob=d.gmask_prob)
    return _fit_lm(c, wd, tok_path, lambda tok: data.pretrain_dataset(d.path, tok, split="train", **kw))


def _sft(c, wd, tok_path):
    kw = dict(experiments.data_kwargs(c), pack=c.data.pack, overlong=c.data.overlong)
    return _fit_lm(c, wd, tok_path, lambda tok: data.sft_dataset(c.data.path, tok, split="train", **kw))


def _samples(config, wd, sft_dir, files, task):
    """K SFT samples per prompt, ranked by the labeler: `prefs_train.jsonl` and `prefs_heldout.jsonl`."""
    cfg, params, tok = load_policy(sft_dir)
    s, info = config.samples, {}
    sets = {"train": [p for name in s.train_prompts for p in qa.read_prompts(files[name])],
            "heldout": qa.read_prompts(files["rm_eval"])}
    for name, prompts in sets.items():
        responses = sample(cfg, params, tok, [p for p in prompts for _ in range(s.k)], temperature=s.temperature,
                           max_new_tokens=s.max_new_tokens, batch_size=s.batch_size * s.k,
                           seed=config.seed + len(name))
        rows, scores = task.preference_rows(prompts, responses, s.k)
        if not rows and name == "train":
            raise RuntimeError(f"samples: the labeler scored all {s.k} SFT samples of every {name} prompt alike, "
                               "so there is no preference to learn; train the SFT stage longer")
        if not rows:  # the reward model trains, but its held-out accuracy is undefined (reported as NaN)
            print(f"samples: the labeler scored all {s.k} SFT samples of every held-out prompt alike: no held-out "
                  "pairs to measure the reward model on; train the SFT stage longer", flush=True)
        qa.write_jsonl(os.path.join(wd, f"prefs_{name}.jsonl"), rows)
        info[name] = {"prompts": len(prompts), "ranked_prompts": len(rows), "gold_mean": float(np.mean(scores))}
    return info


def _reward(c, wd):
    """The body of experiments/reward.py, with the score normalisation measured on the training samples."""
    model_cfg, _, sft_ckpt, tok = experiments.start_from_sft(c, wd, "the reward model starts from")
    mesh, rules = trainer.mesh_and_rules(c)

    def init_params(abstract):
        sft = checkpoint.load_params(sft_ckpt, reward.abstract_params(model_cfg, "lm", mesh, rules))
        params = reward.init_from_sft(model_cfg, sft, jax.random.PRNGKey(c.seed), c.reward.head_init)
        return jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), params, abstract)

    kw = dict(experiments.data_kwargs(c), k=c.data.k, overlong=c.data.overlong)
    state = trainer.fit(c, wd, loss_fn=reward.reward_loss_fn(model_cfg),
                        build_params=experiments.build_params(model_cfg, head="scalar"),
                        train_data=data.preference_dataset(c.data.path, tok, split="train", **kw),
                        init_params=init_params, meta={"model": model_cfg.to_dict(), "head": "scalar"})
    params = jax.device_get(state.params)
    scores = [s for row in _read_jsonl(c.data.path)
              for s in score(model_cfg, params, tok, row["prompt"], row["responses"], c.data.seq_len)]
    mean, std = float(np.mean(scores)), float(np.std(scores))
    reward.save_normalization(wd, mean, std, len(scores))
    return {"score_mean": mean, "score_std": std}


def _ppo(c, wd, task):
    """PPO (rl.ppo_loop), grading every rollout with the labeler for the curves."""
    model_cfg, _, _, tok = experiments.start_from_sft(c, wd, "(actor and reference)")
    curve = os.path.join(wd, "gold.jsonl")

    def on_iteration(it, metrics, out, prompt_batch):
        tokens, lengths, resp, n = jax.device_get((prompt_batch["tokens"], prompt_batch["lengths"], out.tokens,
                                                   out.lengths))
        gold = [task.gold_score(tok.decode(p[:m]).strip(), _text(tok, r[:k]))
                for p, m, r, k in zip(tokens, lengths, resp, n)]
        with open(curve, "a") as f:
            f.write(json.dumps({"step": it, "gold": float(np.mean(gold))}) + "\n")

    ppo_loop.train(c, wd, model_cfg=model_cfg, tokenizer=tok, sft_dir=c.init_from, reward_dir=c.reward_from,
                   meta={"model": model_cfg.to_dict(), "config": c.to_dict()}, on_iteration=on_iteration)
    return {}


def _dpo(c, wd):
    """The body of experiments/dpo.py."""
    model_cfg, init_params, sft_ckpt, tok = experiments.start_from_sft(c, wd, "(policy start and reference)")
    mesh, rules = trainer.mesh_and_rules(c)
    ref = checkpoint.load_params(sft_ckpt, reward.abstract_params(model_cfg, "lm", mesh, rules))
    kw = dict(experiments.data_kwargs(c), k=c.data.k, overlong=c.data.overlong)
    prefs = data.preference_dataset(c.data.path, tok, split="train", **kw)
    state = trainer.fit(c, wd, loss_fn=dpo.dpo_loss_fn(model_cfg, c.dpo.beta, c.dpo.label_smoothing),
                        build_params=experiments.build_params(model_cfg),
                        train_data=dpo.with_reference_logps(prefs, model_cfg, ref, mesh, rules),
                        init_params=init_params, meta={"model": model_cfg.to_dict(), "stage": "dpo"})
    return {"steps": int(state.step)}


# Evaluation ----------------------------------------------------------------------------------------------

def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _text(tok: Tokenizer, ids) -> str:
    """A response's text: its tokens up to (not including) eos."""
    ids = list(ids)
    if tok.eos_id in ids:
        ids = ids[:ids.index(tok.eos_id)]
    return tok.decode(ids).strip()


def load_policy(run_dir: str):
    """`(model config, host params, tokenizer)` of an LM run (pretrain/SFT/DPO) or a PPO run's actor."""
    ckpt = experiments.checkpoint_dir(run_dir)
    cfg = ModelConfig.from_dict(checkpoint.load_meta(ckpt)["model"])
    mesh = sharding.make_mesh((1, -1, 1))
    if checkpoint.load_meta(ckpt).get("stage") == "ppo":
        params = ppo_loop.load_policy(run_dir, cfg, mesh, sharding.RULES)
    else:
        params = checkpoint.load_params(ckpt, reward.abstract_params(cfg, "lm", mesh, sharding.RULES))
    return cfg, jax.device_get(params), Tokenizer.load(os.path.join(run_dir, "tokenizer.model"))


def sample(cfg, params, tok, prompts, *, temperature, max_new_tokens, batch_size, seed) -> list[str]:
    """One response per prompt (chat-formatted), generated in fixed-size batches (one compilation)."""
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids = [list(format_prompt(tok, p)) for p in chunk]
        ids += [ids[-1]] * (batch_size - len(ids))  # pad the last batch to the compiled size
        new = generate(cfg, params, ids, max_new_tokens, temperature=temperature, eos_id=tok.eos_id,
                       seed=seed + start)
        out += [_text(tok, r) for r in new[:len(chunk)]]
    return out


def _pack(tok, prompts, responses, width):
    """Right-padded `prompt + response + eos` rows `[N, width]` and a mask of the response targets."""
    tokens = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width), np.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids = np.concatenate([format_prompt(tok, p), format_response(tok, r)])
        if len(ids) > width:
            raise ValueError(f"prompt {p!r} with response {r!r} takes {len(ids)} tokens, more than {width}; "
                             "raise eval.seq_len")
        tokens[i, :len(ids)] = ids
        mask[i, len(format_prompt(tok, p)):len(ids)] = 1.0
    return tokens, mask


@functools.partial(jax.jit, static_argnames=("cfg", "temperature"))
def _response_logprob(cfg, params, tokens, mask, temperature):
    """Sum of log-probs (at `temperature`) of the masked tokens of each row `[N]`."""
    logits = Transformer(cfg).apply({"params": params}, tokens[:, :-1])
    return (ppo.token_logprobs(logits, tokens[:, 1:], temperature) * mask[:, 1:]).sum(-1)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _last_scores(cfg, params, tokens, last):
    values = Transformer(cfg, head="scalar").apply({"params": params}, tokens)
    return jnp.take_along_axis(values, last[:, None], axis=1)[:, 0]


def score(cfg, params, tok, prompt, responses, width):
    """Reward-model scores of responses to one prompt (the head's value at each response's eos)."""
    tokens, mask = _pack(tok, [prompt] * len(responses), responses, width)
    last = (np.arange(width)[None] * (mask > 0)).max(-1).astype(np.int32)
    return np.asarray(_last_scores(cfg, params, tokens, last)).tolist()


def logprobs(cfg, params, tok, prompts, responses, temperature, width, batch_size):
    """Log-probability of each response given its prompt, `[N]`, in fixed-size batches."""
    out = []
    for start in range(0, len(prompts), batch_size):
        p, r = prompts[start:start + batch_size], responses[start:start + batch_size]
        tokens, mask = _pack(tok, p + [p[-1]] * (batch_size - len(p)), r + [r[-1]] * (batch_size - len(r)), width)
        out.append(np.asarray(_response_logprob(cfg, params, tokens, mask, float(temperature)))[:len(p)])
    return np.concatenate(out)


def pairwise_accuracy(scores_by_prompt, ranks_by_prompt) -> tuple[float, int]:
    """Share of untied pairs the scores order as the ranks do, pooled over prompts (NaN without any pair),
    and the pair count."""
    right = total = 0
    for scores, ranks in zip(scores_by_prompt, ranks_by_prompt):
        for i in range(len(ranks)):
            for j in range(len(ranks)):
                if ranks[i] < ranks[j]:
                    total += 1
                    right += scores[i] > scores[j]
    return (right / total if total else float("nan")), total


def mean_stderr(x) -> dict:
    """Mean and standard error of the mean (sample std / sqrt(n)) of per-prompt values."""
    x = np.asarray(x, np.float64)
    return {"mean": float(x.mean()), "stderr": float(x.std(ddof=1) / np.sqrt(len(x)))}


def _evaluate(config, workdir, dirs, files, task):
    """RM held-out accuracy, gold scores, win rate, KL and sample answers; the report, plot and table."""
    e = config.eval
    prompts = qa.read_prompts(files["eval"])
    report = {"eval_prompts": len(prompts)}

    rm_dir = dirs["reward"]
    rm_cfg = ModelConfig.from_dict(checkpoint.load_meta(experiments.checkpoint_dir(rm_dir))["model"])
    mesh = sharding.make_mesh((1, -1, 1))
    rm = jax.device_get(reward.load(rm_dir, reward.abstract_params(rm_cfg, "scalar", mesh, sharding.RULES)))
    tok = Tokenizer.load(os.path.join(rm_dir, "tokenizer.model"))
    held = _read_jsonl(os.path.join(dirs["samples"], "prefs_heldout.jsonl"))
    acc, pairs = pairwise_accuracy([score(rm_cfg, rm, tok, r["prompt"], r["responses"], e.seq_len) for r in held],
                                   [r["ranks"] for r in held])
    report["reward_model"] = {"heldout_accuracy": acc, "heldout_pairs": pairs, "heldout_prompts": len(held)}

    answers, gold, grades = {}, {}, {}
    ref_cfg, ref, _ = load_policy(dirs["sft"])
    for name in ("sft", "ppo", "dpo"):
        cfg, params, _ = load_policy(dirs[name])
        answers[name] = sample(cfg, params, tok, prompts, temperature=e.temperature, max_new_tokens=e.max_new_tokens,
                               batch_size=e.batch_size, seed=e.seed)
        g = [task.grade(p, r) for p, r in zip(prompts, answers[name])]
        gold[name] = np.array([x.score for x in g])
        grades[name] = {"correct": float(np.mean([x.correct for x in g])),
                        "complete": float(np.mean([x.complete for x in g]))}
        if name != "sft":
            kw = dict(temperature=e.temperature, width=e.seq_len, batch_size=e.batch_size)
            kl = (logprobs(cfg, params, tok, prompts, answers[name], **kw)
                  - logprobs(ref_cfg, ref, tok, prompts, answers[name], **kw))
            report[name] = {"kl": float(kl.mean()), "kl_stderr": mean_stderr(kl)["stderr"]}
    report["gold"] = {n: {**mean_stderr(g), **grades[n]} for n, g in gold.items()}
    diff = gold["ppo"] - gold["sft"]
    report["ppo_vs_sft_win_rate"] = float(np.mean((diff > 0) + 0.5 * (diff == 0)))
    se = np.hypot(report["gold"]["ppo"]["stderr"], report["gold"]["sft"]["stderr"])
    report["ppo_minus_sft"] = {"mean": float(diff.mean()), "stderr_unpaired": float(se),
                               "stderr_paired": mean_stderr(diff)["stderr"],
                               "standard_errors": float(diff.mean() / se) if se > 0 else float("inf")}
    report["examples"] = [{"prompt": prompts[i], **{n: answers[n][i] for n in answers}}
                          for i in range(min(e.examples, len(prompts)))]
    curves = _curves(dirs["ppo"])
    report["ppo"]["final_train_kl"] = curves["kl"][-1] if curves["kl"] else None
    _plot(curves, os.path.join(workdir, "ppo_curves.png"))
    return report


def _curves(ppo_dir):
    """PPO's per-iteration reward-model score and KL (metrics.jsonl) and labeler score (gold.jsonl)."""
    metrics = {}
    for row in _read_jsonl(os.path.join(ppo_dir, "metrics.jsonl")):
        if "score" in row:
            metrics[row["step"]] = row
    gold = {row["step"]: row["gold"] for row in _read_jsonl(os.path.join(ppo_dir, "gold.jsonl"))}
    steps = sorted(metrics)
    return {"step": steps, "score": [metrics[s]["score"] for s in steps], "kl": [metrics[s]["kl"] for s in steps],
            "gold_step": sorted(gold), "gold": [gold[s] for s in sorted(gold)]}


def _plot(curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (x, y, title) in zip(axes, ((curves["step"], curves["score"], "reward-model score (normalised)"),
                                        (curves["step"], curves["kl"], "KL to the SFT reference (nats)"),
                                        (curves["gold_step"], curves["gold"], "labeler (gold) score of rollouts"))):
        ax.plot(x, y)
        ax.set_title(title)
        ax.set_xlabel("PPO iteration")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(report) -> str:
    """The results table printed at the end of the job."""
    g = report["gold"]
    lines = [f"reward model held-out pairwise accuracy  {report['reward_model']['heldout_accuracy']:.3f}  "
             f"({report['reward_model']['heldout_pairs']} pairs, {report['reward_model']['heldout_prompts']} prompts)",
             f"gold score on {report['eval_prompts']} held-out prompts (mean +- stderr; share correct / complete):"]
    for name in ("sft", "ppo", "dpo"):
        lines.append(f"  {name.upper():4s} {g[name]['mean']:.3f} +- {g[name]['stderr']:.3f}   "
                     f"correct {g[name]['correct']:.2f}  complete {g[name]['complete']:.2f}")
    d = report["ppo_minus_sft"]
    lines += [f"PPO - SFT  {d['mean']:+.3f} ({d['standard_errors']:.1f} standard errors, unpaired)",
              f"PPO vs SFT win rate (ties count half)  {report['ppo_vs_sft_win_rate']:.3f}",
              f"KL to the SFT reference (nats/response)  PPO {report['ppo']['kl']:.3f}   DPO {report['dpo']['kl']:.3f}",
              "sample answers (SFT | PPO | DPO):"]
    for ex in report["examples"]:
        lines.append(f"  Q: {ex['prompt']}")
        for name in ("sft", "ppo", "dpo"):
            lines.append(f"     {name.upper():4s} {ex[name]}")
    return "\n".join(lines)


# Driver ----------------------------------------------------------------------------------------------------

def stage_configs(config, workdir):
    """Each trainer stage's config with the pipeline's data paths and `init_from` links filled in."""
    files = qa.data_files(config.task.data_dir)
    dirs = {s: os.path.join(workdir, s) for s in STAGES}
    tok = os.path.join(dirs["tokenizer"], "tokenizer.model")
    cache = os.path.join(workdir, "data_cache")
    out = {}
    for name, path, init in (("pretrain", files["pretrain"], ""), ("sft", files["sft"], dirs["pretrain"]),
                             ("reward", os.path.join(dirs["samples"], "prefs_train.jsonl"), dirs["sft"]),
                             ("ppo", files["rl"], dirs["sft"]),
                             ("dpo", os.path.join(dirs["samples"], "prefs_train.jsonl"), dirs["sft"])):
        c = config[name].copy_and_resolve_references()
        c.data.path, c.data.tokenizer, c.init_from = path, tok, init
        if "cache_dir" in c.data:
            c.data.cache_dir = cache
        if name == "ppo":
            c.reward_from = dirs["reward"]
        out[name] = c
    return files, dirs, tok, out


def run(config, workdir: str) -> dict:
    """Run (or resume) every stage under `workdir`; returns the report (also in `workdir/report.json`)."""
    files, dirs, tok, c = stage_configs(config, workdir)
    task = qa.QATask(qa.load_facts(config.task.facts))
    jobs = {
        "tokenizer": lambda: _tokenizer(config, dirs["tokenizer"], files),
        "pretrain": lambda: _pretrain(c["pretrain"], dirs["pretrain"], tok),
        "sft": lambda: _sft(c["sft"], dirs["sft"], tok),
        "samples": lambda: _samples(config, dirs["samples"], dirs["sft"], files, task),
        "reward": lambda: _reward(c["reward"], dirs["reward"]),
        "ppo": lambda: _ppo(c["ppo"], dirs["ppo"], task),
        "dpo": lambda: _dpo(c["dpo"], dirs["dpo"]),
        "eval": lambda: _evaluate(config, workdir, dirs, files, task),
    }
    timings = {}
    for name in STAGES:
        done = os.path.join(dirs[name], DONE)
        if os.path.exists(done):
            print(f"stage {name}: already done ({done})", flush=True)
            continue
        os.makedirs(dirs[name], exist_ok=True)
        print(f"stage {name}", flush=True)
        t0 = time.perf_counter()
        info = jobs[name]()
        timings[name] = time.perf_counter() - t0
        with open(done, "w") as f:
            json.dump({"seconds": timings[name], **info}, f, indent=1)
    with open(os.path.join(dirs["eval"], DONE)) as f:
        report = json.load(f)
    report["stage_seconds"] = {s: json.load(open(os.path.join(dirs[s], DONE)))["seconds"] for s in STAGES}
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def main(argv):
    del argv
    t0 = time.perf_counter()
    report = run(_CONFIG.value, _WORKDIR.value)
    print(format_table(report))
    print(f"report: {os.path.join(_WORKDIR.value, 'report.json')}  plot: "
          f"{os.path.join(_WORKDIR.value, 'ppo_curves.png')}  ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    experiments.run(main)
