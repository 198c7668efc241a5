"""orchestrate-report with several run directories: side by side, one PNG, any recipe."""

from __future__ import annotations

import json

import pytest

from orchestrator import report
from orchestrator.store import RunStore, write_json


def make_run(root, config, rounds):
    """A run directory with ``{round: {stage: metrics}}`` and the manifest of a finished run."""
    store = RunStore(root)
    store.create(config, "")
    store.manifest["rounds"] = {str(r): {"status": "done"} for r in rounds if r > 0}
    store.manifest["status"] = "finished"
    store.save()
    for r, stages in rounds.items():
        for stage, metrics in stages.items():
            write_json(store.round(r).metrics_file(stage), metrics)
    return store.root


@pytest.fixture
def runs(tmp_path):
    base = make_run(tmp_path / "a" / "run", {"recipe": "self_reward", "filter": {}}, {
        0: {"eval": {"eval/vs_start/lc_winrate": 50.0, "eval/if/prompt_accuracy": 0.2}},
        1: {"judgments": {"judge/score_mean": 2.5}, "pairs": {"pairs/kept": 64}, "train": {"train/loss": 0.69, "train/pairs": 64},
            "eval": {"eval/vs_start/lc_winrate": 52.5, "eval/vs_prev/winrate": 52.5, "eval/if/prompt_accuracy": 0.25}},
        2: {"judgments": {"judge/score_mean": 2.75}, "pairs": {"pairs/kept": 60}, "train": {"train/loss": 0.61, "train/pairs": 60}},
    })
    filtered = make_run(tmp_path / "b" / "run", {"recipe": "self_reward", "filter": {"rip": {}, "upo": {}}}, {
        1: {"judgments": {"judge/score_mean": 2.4}, "pairs": {"pairs/kept": 40}, "train": {"train/loss": 0.66, "train/pairs": 11}},
    })
    # ALMA trains by SFT on its own data: no judge score, no preference pairs, no eval yet
    alma = make_run(tmp_path / "alma", {"recipe": "alma"}, {1: {"train": {"train/loss": 1.9}}})
    return base, filtered, alma


def test_runs_side_by_side_by_round(runs, capsys, tmp_path):
    png = tmp_path / "cmp.png"
    assert report.main([*map(str, runs), "--plot", str(png)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    titles = [t.strip() for t in lines[0].split("│")]
    assert titles == ["", "a/run (self_reward, finished)", "b/run (self_reward+rip+upo, finished)", "alma (alma, finished)"]
    assert lines[1].split("│")[1].split() == ["pairs", "trained", "judge", "LC", "WR%", "WR", "prev%", "IF", "acc", "loss"]
    by_round = {line.split("│")[0].strip(): [g.split() for g in line.split("│")[1:]] for line in lines[3:6]}
    assert by_round["0"] == [["-", "-", "-", "50.0", "-", "0.200", "-"], ["-"] * 7, ["-"] * 7]
    assert by_round["1"] == [["64", "64", "2.50", "52.5", "52.5", "0.250", "0.6900"],
                             ["40", "11", "2.40", "-", "-", "-", "0.6600"],
                             ["-", "-", "-", "-", "-", "-", "1.9000"]]
    assert by_round["2"][0] == ["60", "60", "2.75", "-", "-", "-", "0.6100"] and by_round["2"][1] == ["-"] * 7
    assert "b/run (self_reward+rip+upo) has no LC WR%, WR prev%, IF acc" in lines
    assert "alma (alma) has no pairs, trained, judge, LC WR%, WR prev%, IF acc" in lines
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plot: {png}" in err


def test_the_plot_has_a_line_per_run_that_has_the_metric(runs, monkeypatch, tmp_path):
    import orchestrator.eval.plot as plot

    figs = []
    monkeypatch.setattr(plot, "save_png", lambda fig, out: figs.append(fig) or out)
    collected = report.collect_runs(runs)
    report.plot_runs(collected, tmp_path / "x.png")
    axes = {ax.get_title(): ax for ax in figs[0].axes if ax.get_title()}
    loss = axes["training loss"]
    assert [line.get_label() for line in loss.get_lines()] == ["a/run", "b/run", "alma"]
    assert list(loss.get_lines()[0].get_xdata()) == [1, 2] and list(loss.get_lines()[0].get_ydata()) == [0.69, 0.61]
    judge = axes["mean judge score of the round's samples"]
    assert [line.get_label() for line in judge.get_lines()] == ["a/run", "b/run"]
    assert len(axes) == len(report.COMPARED)


def test_a_metric_no_run_has_is_said_on_its_panel(tmp_path, monkeypatch):
    import orchestrator.eval.plot as plot

    a = make_run(tmp_path / "x", {"recipe": "alma"}, {1: {"train": {"train/loss": 1.0}}})
    b = make_run(tmp_path / "y", {"recipe": "alma"}, {1: {"train": {"train/loss": 0.8}}})
    figs = []
    monkeypatch.setattr(plot, "save_png", lambda fig, out: figs.append(fig) or out)
    report.plot_runs(report.collect_runs([a, b]), tmp_path / "x.png")
    pairs = next(ax for ax in figs[0].axes if ax.get_title() == "preference pairs made")
    assert not pairs.get_lines() and [t.get_text() for t in pairs.texts] == ["no run has this metric"]


def test_json_metrics_choice_and_errors(runs, capsys, tmp_path):
    assert report.main([str(runs[0]), str(runs[2]), "--json", "--metrics", "judge_score,prompts", "--plot", str(tmp_path / "p.png")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in data] == ["run", "alma"] and data[1]["lacks"] == ["judge", "prompts"]
    assert data[0]["lacks"] == ["prompts"] and [r["judge_score"] for r in data[0]["rows"]] == [None, 2.5, 2.75]

    assert report.main([str(runs[0]), str(runs[1]), "--metrics", "judge_score,bogus"]) == 2
    assert "unknown metric bogus" in capsys.readouterr().err
    assert report.main([str(runs[0]), str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_one_run_still_prints_its_own_table(runs, capsys):
    assert report.main([str(runs[0])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("run: ") and "status: finished" in lines[0]
    assert lines[1].split()[:2] == ["round", "status"] and set(lines[2]) <= {"-", " "}
