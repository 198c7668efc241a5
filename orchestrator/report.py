"""``orchestrate-report RUN_DIR``: the round-by-round table of a run, read from its files.

Reads RUN_DIR/manifest.json and RUN_DIR/rounds/round_XXX/<stage>.metrics.json (no MLflow needed).
Round 0 is the starting model (evaluation only). Win rates are percent against the starting
model ("vs start") or the previous evaluated round ("vs prev"), judged by the fixed eval judge;
LC = length-controlled (± its standard error); IF = share of IF prompts whose every check passes;
agree = the round's model as a judge agreeing with the fixed judge.
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
        if "prompts/seed" in pm or "prompts/self_instruct" in pm:
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
                "judge_agreement": _first(ev, "eval/judge_agreement"),
                "dpo_loss": _first(get("train"), "train/loss", "train/last_loss"),
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
    ("IF check acc", lambda r: _fmt(r["if_check_acc"], ".3f")),
    ("judge agree", lambda r: _fmt(r["judge_agreement"], ".3f")),
    ("DPO loss", lambda r: _fmt(r["dpo_loss"], ".4f")),
]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    cells = [[name for name, _ in COLUMNS]] + [[fn(r) for _, fn in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="orchestrate-report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory (holds manifest.json and rounds/)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--plot", metavar="PNG", help="also write the eval metrics plot to this file")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir).expanduser()
    if not run_dir.is_dir():
        print(f"error: run directory {run_dir} does not exist", file=sys.stderr)
        return 2
    if not (run_dir / MANIFEST).exists() and not round_dirs(run_dir):
        print(f"error: {run_dir} is not a run directory (no {MANIFEST} and no rounds/)", file=sys.stderr)
        return 2
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
