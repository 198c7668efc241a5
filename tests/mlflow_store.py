"""A small, real MLflow store of a 2-round run, written by the project's own bookkeeping
(Controller, Round.stage, Round.checkpoint, Tracker) with made-up stage results: what the MLflow UI
shows for a real run, in seconds and without Ray or a model server."""

from __future__ import annotations

from pathlib import Path

from conftest import make_controller, write_checkpoint

from orchestrator.controller import Round
from orchestrator.eval.plot import plot_run
from orchestrator.types import Generation, Judgment, Pair

ROUNDS = 2
# Per round: the judge's mean score and the DPO loss, distinct so a chart's points can be told apart.
JUDGE_SCORE = {1: 2.25, 2: 3.5}
TRAIN_LOSS = {1: 0.69, 2: 0.41}
LC_WINRATE = {0: 50.0, 1: 56.0, 2: 63.0}


def _generations(t: int) -> list[Generation]:
    return [Generation(prompt_id=f"r{t}p{i}", messages=f"Round {t}: name a colour ({i})", index=k,
                       text=f"answer {k} to prompt {i} of round {t}", num_tokens=6) for i in range(3) for k in range(2)]


def _round_png(path: Path, t: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.bar(["chosen", "rejected"], [4.0, 1.0 + t / 4])
    ax.set_title(f"round {t} pair scores")
    fig.savefig(path)
    plt.close(fig)
    return path


def build_run(model_path: str, run_dir: Path, experiment: str = "ui_check") -> dict:
    """The run and what the UI should show for it: ids, per-round values, artifact names."""
    ctl = make_controller(model_path, run_dir, f"rounds={ROUNDS}", f"tracking.experiment={experiment}")
    for t in range(0, ROUNDS + 1):
        if t == 0:  # the starting model's eval, as orchestrator/eval/loop.py logs it: child round_000
            rnd = Round(ctl, 0)
            rnd.stage("eval", Generation, lambda: ([], {"eval/vs_start/lc_winrate": LC_WINRATE[0]}))
            ctl.tracker.end_round(0)
            continue
        with ctl.round(t) as rnd:
            gens = rnd.stage("generations", Generation, lambda: (_generations(t), {"gen/tokens_mean": 6.0}))
            rnd.stage("judgments", Judgment, lambda: (
                [Judgment(prompt_id=g.prompt_id, index=g.index, score=float(g.index + t), samples=[float(g.index + t)]) for g in gens],
                {"judge/score_mean": JUDGE_SCORE[t]},
            ))
            pairs = [Pair(prompt_id=f"r{t}p{i}", messages=f"Round {t}: name a colour ({i})", chosen=f"answer 1 to prompt {i}",
                          rejected=f"answer 0 to prompt {i}", chosen_score=1.0 + t, rejected_score=float(t)) for i in range(3)]
            rnd.stage("pairs", Pair, lambda: (pairs, {"pairs/kept": 3.0}))
            rnd.stage("train_pairs", Pair, lambda: (pairs, {"filter/kept": 3.0}))
            rnd.checkpoint("policy", "train", lambda out: {**write_checkpoint(out, t), "train/loss": TRAIN_LOSS[t]})
            ctl.log_round_artifacts(rnd, ["pairs", "train_pairs"], gens[:4])
            ctl.tracker.log_round_artifact(t, _round_png(rnd.dir.path / "pair_scores.png", t), "plots")
            rnd.stage("eval", Generation, lambda: ([], {"eval/vs_start/lc_winrate": LC_WINRATE[t]}))
    png = plot_run(ctl.store.root)
    if png:
        ctl.tracker.log_artifact(png)
    ctl.tracker.finish("FINISHED")
    return {
        "uri": ctl.tracker.uri, "experiment_id": ctl.tracker.experiment_id, "parent_id": ctl.tracker.parent_id,
        "children": {t: ctl.store.round_state(t)["mlflow_run_id"] for t in range(0, ROUNDS + 1)},
        "run_dir": ctl.store.root,
    }
