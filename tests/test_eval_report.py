"""orchestrate-report and the eval plot on a synthetic run directory."""

from __future__ import annotations

import json

import pytest

from orchestrator import report
from orchestrator.eval.plot import load_stage_metrics, plot_run
from orchestrator.store import RunStore, write_json


@pytest.fixture
def run_dir(tmp_path):
    store = RunStore(tmp_path / "run")
    store.create({"rounds": 2}, "rounds: 2\n")
    store.manifest["rounds"] = {"1": {"status": "done"}, "2": {"status": "running"}}
    store.save()
    r0, r1, r2 = store.round(0), store.round(1), store.round(2)
    write_json(r0.metrics_file("eval"), {"eval/vs_start/winrate": 50.0, "eval/vs_start/winrate_se": 0.0, "eval/vs_start/lc_winrate": 50.0,
                                          "eval/vs_start/lc_winrate_se": 0.0, "eval/if/prompt_accuracy": 0.25, "eval/if/check_accuracy": 0.4})
    write_json(r1.metrics_file("prompts"), {"prompts/seed": 48, "prompts/self_instruct": 10})
    write_json(r1.metrics_file("judgments"), {"judge/score_mean": 3.21, "judge/parse_rate": 1.0})
    write_json(r1.metrics_file("pairs"), {"pairs/kept": 41})
    write_json(r1.metrics_file("train"), {"train/loss": 0.6812})
    write_json(r1.metrics_file("eval"), {"eval/vs_start/winrate": 61.25, "eval/vs_start/winrate_se": 4.5, "eval/vs_start/lc_winrate": 58.0,
                                          "eval/vs_start/lc_winrate_se": 5.25, "eval/vs_prev/winrate": 61.25, "eval/if/prompt_accuracy": 0.3,
                                          "eval/if/check_accuracy": 0.45, "eval/judge_agreement": 0.625, "eval/policy_judge_parse_rate": 1.0})
    r2.path.mkdir(parents=True)
    (r2.path / "prompts.jsonl").write_text('{"id": "a"}\n{"id": "b"}\n')
    return store.root


def test_report_table(run_dir, capsys):
    assert report.main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "status: running" in lines[0]
    header = lines[1]
    for name in ("round", "prompts", "pairs", "judge score", "WR vs start %", "LC WR vs start %", "IF prompt acc", "judge agree", "train loss"):
        assert name in header
    row0, row1, row2 = lines[3], lines[4], lines[5]
    assert row0.split()[:2] == ["0", "start"] and "50.0 ± 0.0" in row0 and "0.250" in row0
    for value in ("58", "41", "3.21", "61.2 ± 4.5", "58.0 ± 5.2", "0.300", "0.625", "0.6812"):
        assert value in row1
    assert row2.split()[:3] == ["2", "running", "2"]


def test_report_json_and_plot(run_dir, capsys, tmp_path):
    png = tmp_path / "plot.png"
    assert report.main([str(run_dir), "--json", "--plot", str(png)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[1]["lc_winrate"] == 58.0 and rows[1]["dpo_loss"] == 0.6812 and rows[2]["winrate"] is None
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(load_stage_metrics(run_dir)) == [0, 1]
    default = plot_run(run_dir)
    assert default == run_dir / "eval_metrics.png" and default.exists()


def test_report_missing_or_wrong_dir(tmp_path, capsys):
    assert report.main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "does not exist" in err and "\n" not in err
    assert report.main([str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_plot_without_eval_metrics(tmp_path):
    assert plot_run(tmp_path) is None
