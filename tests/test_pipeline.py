"""Smoke test of the main job: the whole pipeline, drastically shortened, through its command line."""
import json
import math
import os
import subprocess
import sys

from experiments import qa_task as qa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("reward_model.heldout_accuracy", "gold.sft.mean", "gold.sft.stderr", "gold.ppo.mean", "gold.ppo.stderr",
        "gold.dpo.mean", "gold.dpo.stderr", "ppo.kl", "ppo_vs_sft_win_rate", "gold.ppo_ptx.mean", "ppo_ptx.kl",
        "ppo_ptx_vs_sft_win_rate", "reward_score.sft.mean", "reward_score.ppo_ptx.mean", "stage_seconds.ppo_ptx",
        "fewshot.pretrain.0shot", "fewshot.pretrain.kshot", "fewshot.pretrain.perplexity", "fewshot.ppo_ptx.0shot",
        "fewshot.ppo_ptx.perplexity", "fewshot.dpo.kshot")
SHORT = {  # a 1-layer model, a few steps per stage
    "tokenizer.vocab_size": 400,
    "pretrain.model.overrides.d_model": 32, "pretrain.model.overrides.n_layers": 1,
    "pretrain.model.overrides.n_heads": 2, "pretrain.model.overrides.n_kv_heads": 2,
    "pretrain.model.overrides.d_ff": 64, "pretrain.model.overrides.vocab_size": 400,
    "pretrain.model.overrides.max_len": 192,
    "pretrain.train.steps": 2, "pretrain.train.batch_size": 4,
    "sft.train.steps": 2, "sft.train.batch_size": 4, "sft.data.seq_len": 96,
    "reward.train.steps": 2, "reward.train.batch_size": 4, "reward.data.k": 3, "reward.data.seq_len": 96,
    "ppo.train.steps": 2, "ppo.train.batch_size": 4, "ppo.ppo.response_length": 6, "ppo.ppo.epochs": 1,
    "ppo.ppo.mini_batches": 1,
    "ppo.data.prompt_len": 64,
    # One of the other RL methods (they share the stage and trainer; tests/rl covers each): PPO-ptx, whose
    # pretraining batches the pipeline wires to the pretraining text's training split.
    "methods": "ppo_ptx",
    "ppo_ptx.train.steps": 2, "ppo_ptx.train.batch_size": 4, "ppo_ptx.ppo.response_length": 6,
    "ppo_ptx.ppo.epochs": 1, "ppo_ptx.ppo.mini_batches": 1, "ppo_ptx.data.prompt_len": 64, "ppo_ptx.ptx.batch_size": 4,
    "dpo.train.steps": 2, "dpo.train.batch_size": 4, "dpo.data.k": 3, "dpo.data.seq_len": 96,
    "eval.max_new_tokens": 6, "eval.batch_size": 16, "eval.seq_len": 128,
}


def _get(report, dotted):
    for part in dotted.split("."):
        report = report[part]
    return report


def _run(workdir, facts, data_dir):
    cmd = [sys.executable, "-m", "experiments.pipeline", "--config=configs/pipeline.py:tiny", f"--workdir={workdir}",
           f"--config.task.facts={facts}", f"--config.task.data_dir={data_dir}"]
    cmd += [f"--config.{k}={v}" for k, v in SHORT.items()]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as the demo runs
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _styles(task, prompt):
    """A complete, a bare and an evasive answer: what a trained SFT model samples."""
    fact = task.fact(prompt)
    return [qa.fill(qa.RELATIONS[fact.relation].answer, fact), fact.answer + ".", qa.EVASIVE[0]]


def test_short_pipeline_writes_the_report_and_resumes(tmp_path):
    # A small knowledge base (every 10th fact) keeps every stage to a few batches.
    facts = tmp_path / "facts.tsv"
    lines = [line for line in open(qa.FACTS_FILE, encoding="utf-8") if not line.startswith("#")]
    facts.write_text("".join(lines[::10]), encoding="utf-8")
    data_dir = tmp_path / "qa"
    files = qa.write_data(str(data_dir), str(facts))
    task = qa.QATask(qa.load_facts(str(facts)))
    workdir = tmp_path / "run"
    # A few SFT steps cannot produce answers the labeler tells apart, so the samples stage is given as done
    # (which also checks that finished stages are skipped), with labeled answers of three styles.
    samples = workdir / "samples"
    samples.mkdir(parents=True)
    for name, split in (("train", "rl"), ("heldout", "rm_eval")):
        prompts = qa.read_prompts(files[split])
        rows, _ = task.preference_rows(prompts, [r for p in prompts for r in _styles(task, p)], 3)
        qa.write_jsonl(str(samples / f"prefs_{name}.jsonl"), rows)
    (samples / "done.json").write_text(json.dumps({"seconds": 0.0}))

    first = _run(workdir, facts, data_dir)
    assert first.returncode == 0, first.stderr[-4000:]
    report = json.loads((workdir / "report.json").read_text())
    for key in KEYS:
        value = _get(report, key)
        assert isinstance(value, float) and math.isfinite(value), (key, value)
    assert 0.0 <= report["reward_model"]["heldout_accuracy"] <= 1.0
    assert report["reward_model"]["heldout_pairs"] == 3 * len(qa.read_prompts(files["rm_eval"]))
    assert report["eval_prompts"] == len(qa.read_prompts(files["eval"]))
    assert (workdir / "curves.png").stat().st_size > 0 and (workdir / "frontier.png").stat().st_size > 0
    assert list(report["gold"]) == ["sft", "ppo", "ppo_ptx", "dpo"]
    assert list(report["fewshot"]) == ["pretrain", "sft", "ppo", "ppo_ptx", "dpo"]
    assert all(r["k"] == 1 and r["perplexity"] > 1.0 for r in report["fewshot"].values())
    logged = [json.loads(line) for line in open(workdir / "ppo_ptx" / "metrics.jsonl")]
    assert any(v > 0 for r in logged for k, v in r.items() if k.endswith("ptx_loss"))  # pretraining loss in the update
    assert "held-out pairwise accuracy" in first.stdout and "win rate" in first.stdout

    # A rerun finds every stage done and gives the same report.
    second = _run(workdir, facts, data_dir)
    assert second.returncode == 0, second.stderr[-4000:]
    again = json.loads((workdir / "report.json").read_text())
    assert {k: _get(again, k) for k in KEYS} == {k: _get(report, k) for k in KEYS}
    assert "already done" in second.stdout
