"""The main job: the whole ChatGPT recipe, tiny, on the bundled QA task (experiments.qa_task), with measured results.

  python -m experiments.pipeline --config=configs/pipeline.py:tiny --workdir=DIR

Stages (each in `DIR/<stage>`; a stage whose `done.json` exists is skipped, a trainer stage interrupted
mid-run resumes from its checkpoint):
  tokenizer  BPE on the pretraining text and the SFT demonstrations.
  pretrain   causal LM on text stating every fact of the knowledge base.
  sft        demonstrations that mix complete, bare, evasive and wrong answers.
  samples    K responses per prompt from the SFT model, ranked by the labeler (experiments.qa_task), which stands
             in for human labelers: preference data for training (`rl` prompts) and held-out (`rm_eval`).
  reward     reward model on the ranked samples (InstructGPT's K-wise loss).
  ppo, dpo   the SFT policy optimised against the reward model (PPO) and on the preferences (DPO).
  ppo_ptx, grpo, rloo, best_of_n (remax, reinforce_pp, online_dpo)  PPO-ptx (PPO plus the pretraining loss) and
             the other RL methods against the same reward model, on PPO's rollout budget (`--config.methods`,
             configs/pipeline.py).
  sft_lora, ppo_lora  with `--config.peft_rows=True`: LoRA-SFT (from pretrain) and LoRA-PPO (from sft).
  eval       reward-model held-out pairwise accuracy; for every policy on the held-out prompts: the labeler's
             (gold) score, win rate against SFT, KL to the SFT reference, reward-model score; sample answers;
             the alignment tax: 0- and k-shot multiple-choice accuracy over the held-out facts and perplexity
             on the pretraining text's held-out documents, for the pretrained model and every policy.
Writes `DIR/report.json`, `DIR/curves.png` (each RL run's reward-model score, KL and gold score by iteration),
`DIR/frontier.png` (gold score against KL) and prints the comparison table.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

import experiments
import lm
from configs.pipeline import RL_METHODS
from experiments import qa_task as qa
from lm import data, fewshot, peft, runs
from lm import stages as lm_stages
from lm.tokenizer import Tokenizer
from rl import evaluate, reward
from rl import stages as rl_stages

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file and preset, e.g. configs/pipeline.py:tiny.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory of the whole pipeline.", required=True)

STAGES = ("tokenizer", "pretrain", "sft", "samples", "reward", "ppo", "dpo") + RL_METHODS + ("sft_lora", "ppo_lora",
                                                                                         "eval")
PEFT_STAGES = ("sft_lora", "ppo_lora")
SAMPLING = ("ppo", "ppo_lora") + RL_METHODS  # the stages that sample during training (gold.jsonl curves)
DONE = "done.json"


# Stages that are not library stages ----------------------------------------------------------------------------

def _tokenizer(config, wd, files):
    corpus = os.path.join(wd, "sft_text.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        for line in open(files["sft"], encoding="utf-8"):
            row = json.loads(line)
            f.write(f"{row['prompt']}\n{row['response']}\n")
    Tokenizer.train(runs.text_files(files["pretrain"]) + [corpus], config.tokenizer.vocab_size,
                    os.path.join(wd, "tokenizer"), seed=config.seed)
    return {}


def _samples(config, wd, sft_dir, files, task):
    """K SFT samples per prompt, ranked by the labeler: `prefs_train.jsonl` and `prefs_heldout.jsonl`."""
    cfg, params, tok = lm.load(sft_dir)
    s, info = config.samples, {}
    sets = {"train": [p for name in s.train_prompts for p in qa.read_prompts(files[name])],
            "heldout": qa.read_prompts(files["rm_eval"])}
    for name, prompts in sets.items():
        responses = evaluate.sample(cfg, params, tok, [p for p in prompts for _ in range(s.k)],
                                    temperature=s.temperature, max_new_tokens=s.max_new_tokens,
                                    batch_size=s.batch_size * s.k, seed=config.seed + len(name))
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
    rl_stages.reward(c, wd)
    with open(os.path.join(wd, reward.NORM_FILE)) as f:
        norm = json.load(f)
    return {"score_mean": norm["mean"], "score_std": norm["std"]}


def methods(config) -> tuple:
    """The RL methods beside PPO and DPO this run has (`config.methods`), checked against RL_METHODS."""
    names = tuple(m.strip() for m in config.methods.split(",") if m.strip())
    unknown = set(names) - set(RL_METHODS)
    if unknown:
        raise ValueError(f"config.methods names {sorted(unknown)}, not among {RL_METHODS}")
    return names


def policies(config) -> tuple:
    """The policies the eval stage compares, in table order."""
    return ("sft", "ppo") + methods(config) + ("dpo",) + (PEFT_STAGES if config.peft_rows else ())


def _ppo(c, wd, task):
    """An RL stage (PPO or another `rl.algorithm`), grading every rollout with the labeler for the curves
    (`gold.jsonl`)."""
    tok = Tokenizer.load(c.data.tokenizer)
    curve = os.path.join(wd, "gold.jsonl")

    def on_iteration(it, metrics, out, prompt_batch):
        tokens, lengths, resp, n = jax.device_get((prompt_batch["tokens"], prompt_batch["lengths"], out.tokens,
                                                   out.lengths))
        gold = [task.gold_score(tok.decode(p[:m]).strip(), evaluate.response_text(tok, r[:k]))
                for p, m, r, k in zip(tokens, lengths, resp, n)]
        with open(curve, "a") as f:
            f.write(json.dumps({"step": it, "gold": float(np.mean(gold))}) + "\n")

    rl_stages.ppo(c, wd, on_iteration=on_iteration)
    return {}


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# Evaluation ----------------------------------------------------------------------------------------------

def _evaluate(config, workdir, dirs, files, task):
    """RM held-out accuracy, gold scores, win rate, KL and sample answers (rl.evaluate); the report and plot."""
    e = config.eval
    prompts = qa.read_prompts(files["eval"])
    report = {"eval_prompts": len(prompts)}
    rm_cfg, rm = reward.load(dirs["reward"])
    tok = Tokenizer.load(os.path.join(dirs["reward"], runs.TOKENIZER))
    held = _read_jsonl(os.path.join(dirs["samples"], "prefs_heldout.jsonl"))
    report["reward_model"] = evaluate.reward_accuracy(rm_cfg, rm, tok, held, width=e.seq_len, batch_size=e.batch_size)
    names = policies(config)
    models = {name: lm.load(dirs[name]) for name in ("pretrain",) + names}  # (cfg, params, tokenizer)
    report.update(evaluate.compare_policies(
        {name: models[name][:2] for name in names}, "sft", tok, prompts,
        lambda p, r: dataclasses.asdict(task.grade(p, r)), temperature=e.temperature, max_new_tokens=e.max_new_tokens,
        batch_size=e.batch_size, seq_len=e.seq_len, seed=e.seed, examples=e.examples, reward=(rm_cfg, rm)))
    curves = {name: _curves(dirs[name]) for name in names if name in SAMPLING}
    for name, c in curves.items():
        report[name]["final_train_kl"] = c["kl"][-1] if c["kl"] else None
    report["fewshot"] = _alignment_tax(config, models, files, task, os.path.join(workdir, "data_cache"))
    _plot(curves, os.path.join(workdir, "curves.png"))
    _plot_frontier(curves, report, os.path.join(workdir, "frontier.png"))
    if config.peft_rows:
        report["peft"] = {name: _adaptation(dirs[name]) for name in ("sft", "ppo") + PEFT_STAGES}
    return report


def _alignment_tax(config, models, files, task, cache_dir) -> dict:
    """`{name: {"0shot", "kshot", "k", "perplexity", "questions"}}` of each of `models` ({name: lm.load's
    result}): multiple-choice accuracy over the held-out facts with 0 and k demonstrations (lm.fewshot), and
    perplexity on the held-out pretraining documents."""
    e, p = config.eval, config.pretrain.data
    examples = qa.fewshot_examples(task, qa.read_prompts(files["eval"]), e.fewshot_choices)
    pool = qa.fewshot_pool(task, qa.read_prompts(files["sft"]))
    prompts = {k: fewshot.kshot_prompts(examples, pool, k, seed=e.seed) for k in (0, e.fewshot_k)}
    out = {}
    for name, (cfg, params, tok) in models.items():
        acc = {k: fewshot.multiple_choice(cfg, params, tok, prompts[k], examples, batch_size=e.batch_size)["accuracy"]
               for k in prompts}
        heldout = data.pretrain_dataset(files["pretrain"], tok, split="eval", seq_len=p.seq_len,
                                        batch_size=e.batch_size, seed=0, num_epochs=1, eval_fraction=p.eval_fraction,
                                        cache_dir=cache_dir)
        out[name] = {"0shot": acc[0], "kshot": acc[e.fewshot_k], "k": e.fewshot_k,
                     "perplexity": fewshot.perplexity(cfg, params, heldout)["perplexity"], "questions": len(examples)}
    return out


def _adaptation(run_dir):
    """Trainable share of the model's parameters and median seconds per step (iteration) of a finished run."""
    cfg = lm.ModelConfig.from_dict(runs.load_meta(run_dir)["model"])
    seconds = [r["seconds"] for r in _read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "seconds" in r]
    fraction = peft.trainable_fraction(cfg) if peft.enabled(cfg) else 1.0
    return {"trainable_fraction": fraction, "step_seconds": float(np.median(seconds[1:] or seconds))}


def _curves(ppo_dir):
    """An RL run's per-iteration reward-model score and KL (metrics.jsonl) and labeler score (gold.jsonl)."""
    metrics = {}
    for row in _read_jsonl(os.path.join(ppo_dir, "metrics.jsonl")):
        if "score" in row:
            metrics[row["step"]] = row
    gold = {row["step"]: row["gold"] for row in _read_jsonl(os.path.join(ppo_dir, "gold.jsonl"))}
    steps = sorted(metrics)
    return {"step": steps, "score": [metrics[s]["score"] for s in steps], "kl": [metrics[s]["kl"] for s in steps],
            "gold_step": sorted(gold), "gold": [gold[s] for s in sorted(gold)]}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _smooth(y, width: int = 5):
    """Trailing moving average (the first points average what exists)."""
    y = np.asarray(y, np.float64)
    c = np.cumsum(np.concatenate([[0.0], y]))
    lo = np.maximum(np.arange(1, len(y) + 1) - width, 0)
    return (c[1:] - c[lo]) / (np.arange(1, len(y) + 1) - lo)


def _plot(curves, path):
    """Learning curves: one line per RL run in each of three panels."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    panels = (("step", "score", "reward-model score of rollouts (normalised)"),
              ("step", "kl", "KL to the SFT reference (nats, training estimate)"),
              ("gold_step", "gold", "labeler (gold) score of rollouts"))
    for ax, (x, y, title) in zip(axes, panels):
        for name, c in curves.items():
            ax.plot(c[x], c[y], label=name.upper())
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_frontier(curves, report, path):
    """Gold score against KL to SFT: each RL run's rollouts by iteration (lines, 5-iteration moving averages of
    both), and every policy's held-out result (markers with standard-error bars)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.6))
    colours = {}
    for name, c in curves.items():
        if c["gold"] and len(c["kl"]) == len(c["gold"]):
            (line,) = ax.plot(_smooth(c["kl"]), _smooth(c["gold"]), alpha=0.45, lw=1.2)
            colours[name] = line.get_color()
    for name, g in report["gold"].items():
        kl = report[name]["kl"] if name != "sft" else 0.0
        ax.errorbar([kl], [g["mean"]], yerr=[g["stderr"]], fmt="o", color=colours.get(name, "k" if name == "sft"
                                                                                              else None),
                    label=name.upper(), capsize=3)
    ax.set_xlabel("KL to the SFT policy (nats per response)")
    ax.set_ylabel("gold (labeler) score")
    ax.set_title("reward vs KL: held-out (markers), training rollouts (lines)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(report) -> str:
    """The results table printed at the end of the job: one row per policy."""
    g, rm, sec = report["gold"], report.get("reward_score", {}), report.get("stage_seconds", {})
    names = list(g)
    w = max(len(n) for n in names + ["method"])
    lines = [f"reward model held-out pairwise accuracy  {report['reward_model']['heldout_accuracy']:.3f}  "
             f"({report['reward_model']['heldout_pairs']} pairs, {report['reward_model']['heldout_prompts']} prompts)",
             f"{report['eval_prompts']} held-out prompts; gold = the labeler's score (mean +- s.e.), win rate vs SFT "
             "(ties half), KL to SFT (nats/response), reward-model score, stage wall time:",
             f"  {'method':{w}s} {'gold':>15s} {'win':>6s} {'KL':>6s} {'RM':>6s} {'wall s':>7s}  correct complete"]
    for name in names:
        win = report.get(f"{name}_vs_sft_win_rate")
        kl = report[name]["kl"] if name in report and "kl" in report[name] else 0.0
        lines.append(f"  {name.upper():{w}s} {g[name]['mean']:7.3f} +- {g[name]['stderr']:.3f} "
                     f"{'' if win is None else f'{win:.3f}':>6s} {kl:6.2f} "
                     f"{rm[name]['mean'] if name in rm else float('nan'):6.2f} {sec.get(name, float('nan')):7.0f}  "
                     f"{g[name]['correct']:.2f}    {g[name]['complete']:.2f}")
    for name in names[1:]:
        d = report[f"{name}_minus_sft"]
        lines.append(f"  {name.upper()} - SFT {d['mean']:+.3f} ({d['standard_errors']:.1f} standard errors, unpaired)")
    for name in PEFT_STAGES if "peft" in report else ():
        full, p = name.split("_")[0], report["peft"]
        lines.append(f"  {name.upper()} trains {100 * p[name]['trainable_fraction']:.1f}% of the parameters, "
                     f"{p[name]['step_seconds']:.3f} s/step ({full.upper()}: {p[full]['step_seconds']:.3f})")
    if "fewshot" in report:
        f = report["fewshot"]
        first = next(iter(f.values()))
        lines.append(f"alignment tax: multiple choice over {first['questions']} held-out facts (0-shot, "
                     f"{first['k']}-shot), perplexity of the held-out pretraining documents:")
        lines.append(f"  {'model':{w}s} {'0-shot':>7s} {str(first['k']) + '-shot':>7s} {'perplexity':>10s}")
        for name, r in f.items():
            lines.append(f"  {name.upper():{w}s} {r['0shot']:7.3f} {r['kshot']:7.3f} {r['perplexity']:10.3f}")
    shown = [n for n in ("sft", "ppo", "dpo") if n in names]
    lines.append(f"sample answers ({' | '.join(n.upper() for n in shown)}):")
    for ex in report["examples"]:
        lines.append(f"  Q: {ex['prompt']}")
        for name in shown:
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
    prefs = os.path.join(dirs["samples"], "prefs_train.jsonl")
    for name, path, init in (("pretrain", files["pretrain"], ""), ("sft", files["sft"], dirs["pretrain"]),
                             ("reward", prefs, dirs["sft"]), ("ppo", files["rl"], dirs["sft"]),
                             ("dpo", prefs, dirs["sft"]), ("sft_lora", files["sft"], dirs["pretrain"]),
                             ("ppo_lora", files["rl"], dirs["sft"])) + tuple((m, files["rl"], dirs["sft"])
                                                                             for m in RL_METHODS):
        c = config[name].copy_and_resolve_references()
        c.data.path, c.data.tokenizer, c.init_from = path, tok, init
        if "cache_dir" in c.data:
            c.data.cache_dir = cache
        if name in SAMPLING:
            c.reward_from = dirs["reward"]
        if "ptx" in c and c.ppo.ptx_coef > 0:  # PPO-ptx mixes in the pretraining text the held-out split leaves
            c.ptx.path, c.ptx.eval_fraction, c.ptx.cache_dir = files["pretrain"], config.pretrain.data.eval_fraction, cache
        out[name] = c
    return files, dirs, tok, out


def _steps(run_dir: str) -> int:
    """The step of a finished run's newest checkpoint."""
    return runs.latest_step(run_dir)


def run(config, workdir: str) -> dict:
    """Run (or resume) every stage under `workdir`; returns the report (also in `workdir/report.json`)."""
    files, dirs, tok, c = stage_configs(config, workdir)
    task = qa.QATask(qa.load_facts(config.task.facts))
    jobs = {
        "tokenizer": lambda: _tokenizer(config, dirs["tokenizer"], files),
        "pretrain": lambda: {"steps": _steps(lm_stages.pretrain(c["pretrain"], dirs["pretrain"]))},
        "sft": lambda: {"steps": _steps(lm_stages.sft(c["sft"], dirs["sft"]))},
        "samples": lambda: _samples(config, dirs["samples"], dirs["sft"], files, task),
        "reward": lambda: _reward(c["reward"], dirs["reward"]),
        "ppo": lambda: _ppo(c["ppo"], dirs["ppo"], task),
        "dpo": lambda: {"steps": _steps(rl_stages.dpo(c["dpo"], dirs["dpo"]))},
        "sft_lora": lambda: {"steps": _steps(lm_stages.sft(c["sft_lora"], dirs["sft_lora"]))},
        "ppo_lora": lambda: _ppo(c["ppo_lora"], dirs["ppo_lora"], task),
        "eval": lambda: _evaluate(config, workdir, dirs, files, task),
        **{m: functools.partial(_ppo, c[m], dirs[m], task) for m in RL_METHODS},
    }
    timings = {}
    chosen = methods(config)
    stages = [s for s in STAGES if (config.peft_rows or s not in PEFT_STAGES) and (s not in RL_METHODS or s in chosen)]
    for name in stages:
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
    report["stage_seconds"] = {s: json.load(open(os.path.join(dirs[s], DONE)))["seconds"] for s in stages}
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def main(argv):
    del argv
    t0 = time.perf_counter()
    report = run(_CONFIG.value, _WORKDIR.value)
    print(format_table(report))
    wd = _WORKDIR.value
    print(f"report: {os.path.join(wd, 'report.json')}  plots: {os.path.join(wd, 'curves.png')}, "
          f"{os.path.join(wd, 'frontier.png')}  ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    experiments.run(main)
