"""``orchestrate-report RUN_DIR``: the round-by-round table of a run, read from its files.

Reads RUN_DIR/manifest.json and RUN_DIR/rounds/round_XXX/<stage>.metrics.json (no MLflow needed).
Round 0 is the starting model (evaluation only). Win rates are percent against the starting
model ("vs start") or the previous evaluated round ("vs prev"), judged by the fixed eval judge;
LC = length-controlled (± its standard error); IF = share of IF prompts whose every check passes;
agree = the round's model as a judge agreeing with the fixed judge.

``orchestrate-report RUN_DIR RUN_DIR ...`` compares runs of any recipe: the same metrics by round,
one column group per run, and one PNG with a line per run per metric (``--plot``, default
./runs_compare.png). A metric that a run never logged (a recipe without a judge, a run not
evaluated yet) is shown as "-" and listed under the table, never an error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from orchestrator.eval.plot import load_stage_metrics, plot_run, round_dirs
from orchestrator.store import MANIFEST, read_json

STAGES = ("prompts", "judgments", "pairs", "train", "eval")


def _count_lines(path: Path) -> int | None:
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as fh:
        return sum(1 for line in fh if line.strip())


def _first(m: dict[str, Any], *keys: str) -> float | None:
    for k in keys:
        v = m.get(k)
        if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
            return float(v)
    return None


def collect(run_dir: str | Path) -> list[dict[str, Any]]:
    """One dict per round with the table's values (None where a value is not there)."""
    run_dir = Path(run_dir)
    manifest = read_json(run_dir / MANIFEST) if (run_dir / MANIFEST).exists() else {}
    stages = {s: load_stage_metrics(run_dir, s) for s in STAGES}
    dirs = round_dirs(run_dir)
    indices = sorted(set(dirs) | {int(k) for k in manifest.get("rounds", {}) if str(k).isdigit()})
    rows = []
    for r in indices:
        get = lambda s: stages[s].get(r, {})  # noqa: E731
        path = dirs.get(r)
        prompts = None
        pm = get("prompts")
        if "prompts/picked" in pm:  # ALMA: K picked from the pool (its prompts/self_instruct counts the synthetic ones among them)
            prompts = float(pm["prompts/picked"])
        elif "prompts/seed" in pm or "prompts/self_instruct" in pm:
            prompts = float(pm.get("prompts/seed", 0)) + float(pm.get("prompts/self_instruct", 0))
        elif path is not None:
            prompts = _count_lines(path / "prompts.jsonl")
        pairs = _first(get("pairs"), "pairs/kept")
        if pairs is None and path is not None:
            pairs = _count_lines(path / "pairs.jsonl")
        ev = get("eval")
        state = manifest.get("rounds", {}).get(str(r), {})
        rows.append(
            {
                "round": r,
                "status": "start" if r == 0 else state.get("status", "-"),
                "prompts": prompts,
                "pairs": pairs,
                "judge_score": _first(get("judgments"), "judge/score_mean"),
                "winrate": _first(ev, "eval/vs_start/winrate"),
                "winrate_se": _first(ev, "eval/vs_start/winrate_se"),
                "lc_winrate": _first(ev, "eval/vs_start/lc_winrate"),
                "lc_winrate_se": _first(ev, "eval/vs_start/lc_winrate_se"),
                "winrate_prev": _first(ev, "eval/vs_prev/winrate"),
                "if_prompt_acc": _first(ev, "eval/if/prompt_accuracy"),
                "if_check_acc": _first(ev, "eval/if/check_accuracy"),
                "if_delta": _first(ev, "eval/if/vs_start/prompt_accuracy_delta"),
                "if_delta_se": _first(ev, "eval/if/vs_start/prompt_accuracy_delta_se"),
                "answer_tokens": _first(ev, "eval/response_tokens_mean"),
                "judge_agreement": _first(ev, "eval/judge_agreement"),
                "dpo_loss": _first(get("train"), "train/loss", "train/last_loss"),
                "train_pairs": _first(get("train"), "train/pairs"),
            }
        )
    return rows


def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "-"
    return format(v, spec)


COLUMNS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("round", lambda r: str(r["round"])),
    ("status", lambda r: str(r["status"])),
    ("prompts", lambda r: _fmt(r["prompts"], ".0f")),
    ("pairs", lambda r: _fmt(r["pairs"], ".0f")),
    ("judge score", lambda r: _fmt(r["judge_score"], ".2f")),
    ("WR vs start %", lambda r: "-" if r["winrate"] is None else f"{r['winrate']:.1f} ± {_fmt(r['winrate_se'], '.1f')}"),
    ("LC WR vs start %", lambda r: "-" if r["lc_winrate"] is None else f"{r['lc_winrate']:.1f} ± {_fmt(r['lc_winrate_se'], '.1f')}"),
    ("WR vs prev %", lambda r: _fmt(r["winrate_prev"], ".1f")),
    ("IF prompt acc", lambda r: _fmt(r["if_prompt_acc"], ".3f")),
    ("IF Δ vs start", lambda r: "-" if r["if_delta"] is None else f"{r['if_delta']:+.3f} ± {_fmt(r['if_delta_se'], '.3f')}"),
    ("IF check acc", lambda r: _fmt(r["if_check_acc"], ".3f")),
    ("answer tokens", lambda r: _fmt(r["answer_tokens"], ".0f")),  # the length trend: growth is the usual failure
    ("judge agree", lambda r: _fmt(r["judge_agreement"], ".3f")),
    ("train loss", lambda r: _fmt(r["dpo_loss"], ".4f")),  # DPO, or SFT in ALMA
]


def format_table(rows: Sequence[dict[str, Any]], rule: bool = True) -> str:
    cells = [[name for name, _ in COLUMNS]] + [[fn(r) for _, fn in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    if rule:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- several runs side by side ------------------------------------------------------------------

# (row key, column name, format, plot panel title) of the metrics compared across runs.
COMPARED: list[tuple[str, str, str, str]] = [
    ("pairs", "pairs", ".0f", "preference pairs made"),
    ("train_pairs", "trained", ".0f", "pairs trained on (after filters)"),
    ("judge_score", "judge", ".2f", "mean judge score of the round's samples"),
    ("lc_winrate", "LC WR%", ".1f", "LC win rate vs start % (fixed judge)"),
    ("winrate_prev", "WR prev%", ".1f", "win rate vs previous round %"),
    ("if_prompt_acc", "IF acc", ".3f", "IF prompt accuracy (strict)"),
    ("dpo_loss", "loss", ".4f", "training loss"),
]


def run_label(run_dir: Path, manifest: dict[str, Any]) -> str:
    """What a run is: ``recipe[+filter...][+transform...]``."""
    config = manifest.get("config", {}) or {}
    parts = [str(config.get("recipe") or "?")]
    for group in ("filter", "transform"):
        parts += sorted((config.get(group) or {}).keys())
    return "+".join(parts)


def _names(run_dirs: Sequence[Path]) -> list[str]:
    """Short unique names for the runs: the folder's name, with as many parents as it takes to tell
    it from the others (``a/run``, ``b/run``, ``alma``)."""
    parts = [Path(d).resolve().parts for d in run_dirs]
    depth = [1] * len(parts)
    while True:
        names = ["/".join(p[-k:]) for p, k in zip(parts, depth)]
        clash = [i for i, n in enumerate(names) if names.count(n) > 1 and depth[i] < len(parts[i])]
        if not clash:
            return names
        for i in clash:
            depth[i] += 1


def collect_runs(run_dirs: Sequence[Path], metrics: Sequence[tuple[str, str, str, str]] = COMPARED) -> list[dict[str, Any]]:
    """Per run: its name, label (recipe and plug-ins), status, rows, and the compared metrics it lacks."""
    runs = []
    for run_dir, name in zip(run_dirs, _names(run_dirs)):
        manifest = read_json(run_dir / MANIFEST) if (run_dir / MANIFEST).exists() else {}
        rows = collect(run_dir)
        lacks = [col for key, col, _, _ in metrics if all(r.get(key) is None for r in rows)]
        runs.append({"run_dir": str(Path(run_dir).resolve()), "name": name, "label": run_label(run_dir, manifest),
                     "status": manifest.get("status", "-"), "rows": rows, "lacks": lacks})
    return runs


def format_comparison(runs: Sequence[dict[str, Any]], metrics: Sequence[tuple[str, str, str, str]] = COMPARED) -> str:
    """Rounds down, one column group per run: the group's title row, the metric names, the values."""
    rounds = sorted({r["round"] for run in runs for r in run["rows"]})
    by_round = [{r["round"]: r for r in run["rows"]} for run in runs]
    groups = []
    for run, rows in zip(runs, by_round):
        cols = [[name] + [_fmt(rows.get(i, {}).get(key), spec) for i in rounds] for key, name, spec, _ in metrics]
        widths = [max(len(c) for c in col) for col in cols]
        body = ["  ".join(col[j].rjust(w) for col, w in zip(cols, widths)) for j in range(len(rounds) + 1)]
        title = f"{run['name']} ({run['label']}, {run['status']})"
        width = max(len(body[0]), len(title))
        groups.append([title.ljust(width)] + [line.rjust(width) for line in body])
    first = ["", "round"] + [str(i) for i in rounds]
    w0 = max(len(c) for c in first)
    lines = []
    for j in range(len(rounds) + 2):
        lines.append(" │ ".join([first[j].rjust(w0)] + [g[j] for g in groups]).rstrip())
    lines.insert(2, "─┼─".join(["─" * w0] + ["─" * len(g[0]) for g in groups]))
    return "\n".join(lines)


def plot_runs(runs: Sequence[dict[str, Any]], out: str | Path, metrics: Sequence[tuple[str, str, str, str]] = COMPARED) -> Path:
    """One panel per metric, one line per run (rounds on x); a panel no run has says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from orchestrator.eval.plot import save_png

    cols = 4 if len(metrics) > 4 else len(metrics)
    nrows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    flat = list(axes.flat)
    for ax, (key, _, _, title) in zip(flat, metrics):
        drawn = 0
        for i, run in enumerate(runs):
            pts = [(r["round"], r[key]) for r in run["rows"] if r.get(key) is not None]
            if pts:
                xs, ys = zip(*pts)
                # a marker of its own per run: runs with equal values (e.g. no filter: pairs) still show apart
                ax.plot(xs, ys, "osD^v<>p*h"[i % 10] + "-", label=run["name"], alpha=0.85)
                drawn += 1
        if not drawn:
            ax.text(0.5, 0.5, "no run has this metric", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set(title=title, xlabel="round")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7)
    for ax in flat[len(metrics):]:
        ax.axis("off")
    return save_png(fig, Path(out))


# Further row keys ``--metrics`` may name.
_EXTRA_METRICS: list[tuple[str, str, str, str]] = [
    ("prompts", "prompts", ".0f", "prompts"),
    ("winrate", "WR%", ".1f", "win rate vs start %"),
    ("if_check_acc", "IF check", ".3f", "IF check accuracy (strict)"),
    ("judge_agreement", "agree", ".3f", "policy judge agreement with the fixed judge"),
]


def _check_run_dir(run_dir: Path) -> str | None:
    if not run_dir.is_dir():
        return f"run directory {run_dir} does not exist"
    if not (run_dir / MANIFEST).exists() and not round_dirs(run_dir):
        return f"{run_dir} is not a run directory (no {MANIFEST} and no rounds/)"
    return None


def compare_main(run_dirs: list[Path], as_json: bool, plot: str | None, metric_keys: str | None) -> int:
    metrics = COMPARED
    if metric_keys:
        known = {m[0]: m for m in COMPARED} | {m[0]: m for m in _EXTRA_METRICS}
        wanted = [k.strip() for k in metric_keys.split(",") if k.strip()]
        unknown = [k for k in wanted if k not in known]
        if unknown:
            print(f"error: unknown metric {', '.join(unknown)}; known: {', '.join(known)}", file=sys.stderr)
            return 2
        metrics = [known[k] for k in wanted]
    try:
        runs = collect_runs(run_dirs, metrics)
    except (OSError, ValueError) as exc:
        print(f"error: cannot read a run: {exc}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(runs, indent=2))
    else:
        print(format_comparison(runs, metrics))
        for run in runs:
            if run["lacks"]:
                print(f"{run['name']} ({run['label']}) has no {', '.join(run['lacks'])}")
    out = plot_runs(runs, plot or "runs_compare.png", metrics)
    print(f"plot: {out}", file=sys.stderr)
    return 0




def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="orchestrate-report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="+", help="a run directory (holds manifest.json and rounds/); several to compare them")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--plot", metavar="PNG", help="also write the eval metrics plot (several runs: the comparison plot, "
                        "default ./runs_compare.png) to this file")
    parser.add_argument("--metrics", metavar="KEYS", help="several runs: the metrics to compare, comma-separated row keys "
                        f"(default {','.join(m[0] for m in COMPARED)})")
    args = parser.parse_args(argv)
    run_dirs = [Path(d).expanduser() for d in args.run_dir]
    for d in run_dirs:
        problem = _check_run_dir(d)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    if len(run_dirs) > 1:
        return compare_main(run_dirs, args.json, args.plot, args.metrics)
    run_dir = run_dirs[0]
    try:
        rows = collect(run_dir)
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {run_dir}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        manifest = read_json(run_dir / MANIFEST) if (run_dir / MANIFEST).exists() else {}
        print(f"run: {run_dir.resolve()}  status: {manifest.get('status', '-')}  rounds: {len([r for r in rows if r['round'] > 0])}")
        print(format_table(rows) if rows else "(no rounds yet)")
    if args.plot:
        out = plot_run(run_dir, args.plot)
        print(f"plot: {out}" if out else "plot: no eval metrics to plot", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
