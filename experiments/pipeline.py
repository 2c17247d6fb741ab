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
  sft_lora, ppo_lora  with `--config.peft_rows=True`: LoRA-SFT (from pretrain) and LoRA-PPO (from sft).
  eval       reward-model held-out pairwise accuracy; the labeler's (gold) score of SFT, PPO and DPO (and the
             LoRA rows) on the held-out prompts; PPO-vs-SFT win rate; KL to the SFT reference; sample answers.
Writes `DIR/report.json`, `DIR/ppo_curves.png` and prints the results table.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

import experiments
import lm
from experiments import qa_task as qa
from lm import peft, runs
from lm import stages as lm_stages
from lm.tokenizer import Tokenizer
from rl import evaluate, reward
from rl import stages as rl_stages

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file and preset, e.g. configs/pipeline.py:tiny.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory of the whole pipeline.", required=True)

STAGES = ("tokenizer", "pretrain", "sft", "samples", "reward", "ppo", "dpo", "sft_lora", "ppo_lora", "eval")
PEFT_STAGES = ("sft_lora", "ppo_lora")
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


def _ppo(c, wd, task):
    """PPO, grading every rollout with the labeler for the curves (`gold.jsonl`)."""
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
    names = ("sft", "ppo", "dpo") + (PEFT_STAGES if config.peft_rows else ())
    policies = {name: lm.load(dirs[name])[:2] for name in names}
    report.update(evaluate.compare_policies(
        policies, "sft", tok, prompts, lambda p, r: dataclasses.asdict(task.grade(p, r)),
        temperature=e.temperature, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, seq_len=e.seq_len,
        seed=e.seed, examples=e.examples))
    curves = _curves(dirs["ppo"])
    report["ppo"]["final_train_kl"] = curves["kl"][-1] if curves["kl"] else None
    _plot(curves, os.path.join(workdir, "ppo_curves.png"))
    if config.peft_rows:
        report["peft"] = {name: _adaptation(dirs[name]) for name in ("sft", "ppo") + PEFT_STAGES}
    return report


def _adaptation(run_dir):
    """Trainable share of the model's parameters and median seconds per step (iteration) of a finished run."""
    cfg = lm.ModelConfig.from_dict(runs.load_meta(run_dir)["model"])
    seconds = [r["seconds"] for r in _read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "seconds" in r]
    fraction = peft.trainable_fraction(cfg) if peft.enabled(cfg) else 1.0
    return {"trainable_fraction": fraction, "step_seconds": float(np.median(seconds[1:] or seconds))}


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
    for name in PEFT_STAGES if "peft" in report else ():
        full, p = name.split("_")[0], report["peft"]
        lines.append(f"  {name.upper():8s} {g[name]['mean']:.3f} +- {g[name]['stderr']:.3f}   trains "
                     f"{100 * p[name]['trainable_fraction']:.1f}% of the parameters, {p[name]['step_seconds']:.3f} s/step "
                     f"({full.upper()}: {p[full]['step_seconds']:.3f})")
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
                             ("dpo", os.path.join(dirs["samples"], "prefs_train.jsonl"), dirs["sft"]),
                             ("sft_lora", files["sft"], dirs["pretrain"]), ("ppo_lora", files["rl"], dirs["sft"])):
        c = config[name].copy_and_resolve_references()
        c.data.path, c.data.tokenizer, c.init_from = path, tok, init
        if "cache_dir" in c.data:
            c.data.cache_dir = cache
        if name.startswith("ppo"):
            c.reward_from = dirs["reward"]
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
    }
    timings = {}
    stages = [s for s in STAGES if config.peft_rows or s not in PEFT_STAGES]
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
    print(f"report: {os.path.join(_WORKDIR.value, 'report.json')}  plot: "
          f"{os.path.join(_WORKDIR.value, 'ppo_curves.png')}  ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    experiments.run(main)
