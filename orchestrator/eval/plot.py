"""A PNG of the eval metrics against the round, from a run directory's round metrics files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

from orchestrator.store import read_json

PNG_NAME = "eval_metrics.png"
_ROUND_DIR = re.compile(r"^round_(\d+)$")
# (title, y label, y limits, [(metric, label, style)]); a metric's "<metric>_se" gives error bars.
PANELS = (
    ("Pairwise win rate (fixed judge)", "%", (0, 100), (
        ("eval/vs_start/winrate", "win rate vs start", "o-"),
        ("eval/vs_start/lc_winrate", "LC win rate vs start", "s-"),
        ("eval/vs_prev/winrate", "win rate vs previous", "^--"),
        ("eval/refined/vs_start/winrate", "refined (chain) vs start", "D-."),
    )),
    ("Instruction following (IFEval-style)", "accuracy", (0, 1), (
        ("eval/if/prompt_accuracy", "prompt-level (strict)", "o-"),
        ("eval/if/check_accuracy", "check-level (strict)", "s-"),
        ("eval/if_loose/prompt_accuracy", "prompt-level (loose)", "o--"),
        ("eval/refined/if/prompt_accuracy", "prompt-level, refined (strict)", "D-."),
    )),
    ("Judge reliability", "fraction", (0, 1.05), (
        ("eval/judge_agreement", "policy judge agreement", "o-"),
        ("eval/policy_judge_parse_rate", "policy judge parse rate (eval)", "s--"),
        ("eval/judge_parse_rate", "judge parse rate (round)", "^:"),
    )),
)  # fmt: skip


def round_dirs(run_dir: str | Path) -> dict[int, Path]:
    """``{round index: path}`` for every rounds/round_XXX folder, in order."""
    root = Path(run_dir) / "rounds"
    found = {}
    if root.is_dir():
        for p in root.iterdir():
            m = _ROUND_DIR.match(p.name)
            if m and p.is_dir():
                found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def load_stage_metrics(run_dir: str | Path, stage: str = "eval") -> dict[int, dict[str, float]]:
    """``{round: metrics}`` from rounds/round_XXX/<stage>.metrics.json (rounds without it are left out)."""
    out = {}
    for index, path in round_dirs(run_dir).items():
        file = path / f"{stage}.metrics.json"
        if file.exists():
            out[index] = read_json(file)
    return out


def _series(metrics: Mapping[int, Mapping[str, float]], key: str) -> tuple[list[int], list[float]]:
    xs = [r for r, m in metrics.items() if key in m and m[key] == m[key]]
    return xs, [float(metrics[r][key]) for r in xs]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """Write the PNG (default RUN_DIR/eval_metrics.png); None when no round has eval metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = load_stage_metrics(run_dir)
    if not metrics:
        return None
    out = Path(out) if out else Path(run_dir) / PNG_NAME
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))

    for ax, (title, ylabel, ylim, lines) in zip(axes, PANELS):
        for key, label, style in lines:
            xs, ys = _series(metrics, key)
            if not xs:
                continue
            _, errs = _series({r: metrics[r] for r in xs}, key + "_se")
            ax.errorbar(xs, ys, yerr=errs if len(errs) == len(xs) else None, fmt=style, capsize=3, label=label)
        ax.set(title=title, xlabel="round", ylabel=ylabel, ylim=ylim)
        ax.legend(fontsize=8)
    axes[0].axhline(50, color="grey", lw=0.8, ls=":")

    rounds = sorted(metrics)
    for ax in axes:
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
    return save_png(fig, out)


def save_png(fig: Any, out: Path) -> Path:
    """Write ``fig`` to ``out`` atomically (a reader never sees half a PNG) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out
