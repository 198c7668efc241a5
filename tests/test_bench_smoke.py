"""The bench suite's entry point in its smoke mode on the tiny model: it runs end to end and writes
the five ratios. The full-size bench is not run here (python -m bench on an idle machine)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT


def fake_run(root):
    """A finished one-round run with the metrics files a real round writes (values chosen to add up)."""
    rounds = root / "rounds"
    (rounds / "round_000").mkdir(parents=True)
    (rounds / "round_001").mkdir()
    (root / "manifest.json").write_text(json.dumps({"rounds": {"0": {"logged": ["eval"]}, "1": {"status": "done", "wall_s": 100.0}}}))
    files = {
        "round_000/eval": {"time/eval_generate_s": 10.0, "time/eval_judge_s": 0.0, "time/eval_s": 11.0},
        "round_001/prompts": {"time/prompts_s": 5.0},
        "round_001/generations": {"gen/tokens": 200.0, "gen/tokens_per_s": 10.0, "time/generations_s": 21.0},
        "round_001/judgments": {"time/judgments_s": 7.0},
        "round_001/pairs": {"time/pairs_s": 0.01},
        "round_001/train": {"train/train_s": 30.0, "time/train_s": 33.0},
        "round_001/eval": {"time/eval_generate_s": 8.0, "time/eval_judge_s": 4.0, "time/eval_s": 13.0},
    }
    for name, metrics in files.items():
        (rounds / f"{name}.metrics.json").write_text(json.dumps(metrics))
    return root


def test_overhead_reads_a_finished_run(tmp_path):
    from bench.suite import overhead

    got = overhead(fake_run(tmp_path / "run"))
    r = got["rounds"][0]
    # compute: eval_start 10 + prompts 5 + generation 200/10 + judging 7 + train 30 + eval 12 = 84 of 100 s
    assert r["compute_s"] == {"eval_start": 10.0, "prompts": 5.0, "generations": 20.0, "judgments": 7.0, "train": 30.0, "eval": 12.0}
    assert got["overhead_share"] == pytest.approx(0.16)


def test_bench_quick_writes_the_five_ratios(tiny_checkpoint, tmp_path):
    out = tmp_path / "bench.json"
    cmd = ["nice", "-n", "19", sys.executable, "-m", "bench", "--quick", "--model", tiny_checkpoint,
           "--run-dir", str(fake_run(tmp_path / "run")), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    ratios = report["ratios"]
    for key in ("generation_speedup", "judging_speedup", "dpo_speedup"):
        assert ratios[key] > 0, key
    assert set(ratios["flops_share"]) == {"generation_ours", "generation_hf", "judging_ours", "judging_naive", "dpo_ours", "dpo_plain_trl"}
    assert all(0 < v < 2 for v in ratios["flops_share"].values()), ratios["flops_share"]
    assert ratios["overhead_share"] == pytest.approx(0.16)
    assert report["peak_flops"]["float32"] > 1e8 and report["peak_flops"]["bfloat16"] > 0
    # Our judge and the naive forward read the same probabilities from the same token ids: same scores.
    assert report["judging"]["score_abs_diff_mean"] < 0.05
    assert report["generation"]["ours_tokens"] > 0 and report["generation"]["hf_tokens"] > 0
    assert report["dpo"]["ours_steps"] == report["dpo"]["plain_trl_steps"] == 2  # 4 pairs in batches of 2, both sides
    assert report["dpo"]["bf16"] is False  # conf/train/dpo.yaml's default; --train-bf16 changes it for both
    assert report["handoffs"]["weight_sync_in_place_s"] > 0
    for line in ("(1) generation", "(2) judging", "(3) DPO", "(4) share of matmul peak", "(5) orchestrator overhead: 16.0%"):
        assert line in proc.stdout


def test_sweep_variants_table_and_plot(tmp_path):
    from bench.sweep import parse_variant, plot, row, table

    assert parse_variant("paper:") == ("paper", [], None)
    assert parse_variant("fast:train.learning_rate=1e-5,pairs=32,train.bf16=true") == (
        "fast", ["train.learning_rate=1e-5", "train.bf16=true"], 32)
    for bad in (":train.bf16=true", "x:train.bf16"):
        with pytest.raises(SystemExit):
            parse_variant(bad)
    trained = {"steps": 4, "wall_s": 9.0, "metrics": {"train/train_s": 8.0, "train/first_loss": 0.6931, "train/loss": 0.68}}
    ev = {"eval/vs_start/winrate": 55.5, "eval/vs_start/winrate_se": 1.25, "eval/if/prompt_accuracy": 0.2,
          "eval/if/vs_start/prompt_accuracy_delta": 0.05, "eval/if/vs_start/prompt_accuracy_delta_se": 0.02}
    r = row("fast", 32, trained, ev)
    assert r["train_s"] == 8.0 and r["margin"] is None
    text = table([r], {"eval/if/prompt_accuracy": 0.15})
    assert "| fast | 32 | 4 | 8 | 0.6931 | 0.6800 | - | 55.5 | 1.2 | 0.200 | +0.050 | 0.020 |" in text
    assert "| start |" in text and "0.150" in text
    plot([r, r | {"name": "other"}], tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_overhead_leaves_out_a_resumed_round(tmp_path):
    from bench.suite import overhead

    run = fake_run(tmp_path / "run")
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["rounds"]["1"]["wall_s"] = 50.0  # resumed: less wall time than its stages' compute (84 s)
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit, match="ran in one go"):
        overhead(run)
