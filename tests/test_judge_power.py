"""bench/judge_power.py: the known-worse answers it builds and the figures it reads off a judge's
verdicts, then its entry point end to end on the tiny model (the default model's figures are in
docs/sweep.md; the probe itself is a bench, not run here at full size)."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
from conftest import ROOT

from bench import judge_power
from orchestrator.eval.pairwise import PairVerdict

ANSWERS = ["Paris is the capital of France.", "Water boils at 100 degrees Celsius at sea level.", "Two plus two is four."]


def test_controls_are_worse_versions_of_each_answer():
    rng = random.Random(0)
    off = judge_power.off_topic(ANSWERS, rng)
    assert sorted(off) == sorted(ANSWERS) and all(o != a for o, a in zip(off, ANSWERS))
    assert judge_power.refusal(ANSWERS, rng) == [judge_power.REFUSAL] * 3
    assert [len(t.split()) for t in judge_power.truncated(ANSWERS, rng)] == [6, 8, 5]
    mixed = judge_power.shuffled(ANSWERS, random.Random(1))
    assert [sorted(m.split()) for m in mixed] == [sorted(a.split()) for a in ANSWERS]
    assert mixed != ANSWERS


def test_power_row_tells_a_blind_judge_from_one_that_sees():
    # Always "Output (a)": every pair a 50 % tie in soft mode, and P(first) is 1.
    blind = [PairVerdict(1.0, 0.0, 0.5, 2) for _ in range(10)]
    row = judge_power.power_row(blind)
    assert row["winrate"] == pytest.approx(50.0) and row["winrate_se"] == pytest.approx(0.0)
    assert row["p_first"] == pytest.approx(1.0) and row["both_orders_agree"] == 0.0 and row["position_consistency"] == 0.0
    # Prefers the model in both orders, a little position bias left.
    seeing = [PairVerdict(0.9, 0.7, 0.8, 2), PairVerdict(0.8, 0.6, 0.7, 2), PairVerdict(0.6, 0.4, 0.5, 2)]
    row = judge_power.power_row(seeing)
    assert row["winrate"] == pytest.approx(100 * (0.8 + 0.7 + 0.5) / 3)
    assert row["hard_winrate"] == pytest.approx(100 * (1 + 1 + 0.5) / 3)
    assert row["both_orders_agree"] == pytest.approx(2 / 3) and row["position_consistency"] == pytest.approx(2 / 3)
    # P(a): 0.9, 0.3, 0.8, 0.4, 0.6, 0.6
    assert row["p_first"] == pytest.approx(3.6 / 6)
    assert row["z"] == pytest.approx((row["winrate"] - 50) / row["winrate_se"]) and row["z"] > 1
    # Identical answers are ties nobody asked about; a pair with no probabilities is not judged.
    row = judge_power.power_row([PairVerdict(0.5, 0.5, 0.5, 2, identical=True), PairVerdict(None, None, None, 0), *seeing])
    assert row["pairs"] == 5 and row["judged"] == 3


def test_the_probe_runs_on_the_tiny_model(tiny_checkpoint, tmp_path):
    out = tmp_path / "power.json"
    answers = tmp_path / "eval_generations.jsonl"
    prompts = [json.loads(line) for line in (ROOT / "orchestrator" / "data" / "eval_prompts.jsonl").read_text().splitlines()[:4]]
    sets = [{"set": "eval", "prompt_id": p.get("id", f"eval-{i}"), "messages": [{"role": "user", "content": p["prompt"]}],
             "text": "A fixed answer.", "num_tokens": 3, "finish_reason": "stop"} for i, p in enumerate(prompts)]
    answers.write_text("".join(json.dumps(s) + "\n" for s in sets))
    cmd = [sys.executable, "-m", "bench.judge_power", "--out", str(out), "--set", "model=local", f"model.path={tiny_checkpoint}",
           "eval.max_prompts=4", "eval.decoding.max_tokens=8", "eval.answer_cache=null",
           "generation.engine.kv_cache_gib=0.25", "generation.engine.max_model_len=2048"]
    proc = subprocess.run([*cmd, "--answers", str(answers)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["prompts"] == 4 and report["judge"] == tiny_checkpoint
    assert set(report["comparisons"]) == {*judge_power.CONTROLS, f"answers:{answers}"}
    for name, row in report["comparisons"].items():
        assert row["pairs"] == 4 and len(row["verdicts"]) == 4, name
        assert 0 <= row["p_first"] <= 1 and 0 <= row["winrate"] <= 100, (name, row)
