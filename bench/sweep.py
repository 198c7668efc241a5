"""``python -m bench.sweep``: which training settings make a round's pairs move the model, judged by the eval.

One fixed set of preference pairs (a real round's ``train_pairs.jsonl``), several training variants
(learning rate, batch size, epochs, pairs, dropout, precision: any ``train.*`` key), each trained from
the starting model with the project's trainer worker and evaluated with ``orchestrate-eval`` (the
fixed judge's win rate against the start, IF accuracy and its paired change, answer length). The
start's eval answers are generated once and reused by every variant. Writes ``sweep.json``, a
markdown table and a PNG. Issue 15 chose the default ``train`` settings with it (docs/sweep.md)::

    python -m bench.sweep --pairs RUN/rounds/round_001/train_pairs.jsonl --out docs/sweep \\
        --variant paper: \\
        --variant lr1e-5_b4:train.learning_rate=1e-5,train.batch_size=4,train.dropout=0

A variant is ``NAME:k=v,k=v`` with config overrides as on the ``orchestrate`` command line (applied
over ``+experiment=self_reward``), plus ``pairs=N`` (the first N pairs; default all). Everything else
is the config's (``train.*`` of the experiment). ``--eval k=v ...`` overrides go to every eval.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from orchestrator.eval.generations import GENERATIONS_FILE

ROOT = Path(__file__).resolve().parent.parent

# What the table shows of each variant's eval (orchestrate-eval's round 1) and training.
COLUMNS = [
    ("pairs", "pairs", "{:.0f}"),
    ("steps", "steps", "{:.0f}"),
    ("train_s", "train s", "{:.0f}"),
    ("first_loss", "first loss", "{:.4f}"),
    ("loss", "mean loss", "{:.4f}"),
    ("margin", "last margin", "{:.3f}"),
    ("winrate", "WR vs start %", "{:.1f}"),
    ("winrate_se", "± se", "{:.1f}"),
    ("if_acc", "IF acc", "{:.3f}"),
    ("if_delta", "IF Δ", "{:+.3f}"),
    ("if_delta_se", "± se", "{:.3f}"),
    ("identical", "same answer", "{:.2f}"),
    ("tokens", "answer tokens", "{:.0f}"),
    ("truncated", "truncated", "{:.2f}"),
]


def parse_variant(spec: str) -> tuple[str, list[str], int | None]:
    """``NAME:k=v,k=v`` -> (name, overrides, pairs)."""
    name, _, rest = spec.partition(":")
    if not name:
        raise SystemExit(f"bench.sweep: a variant needs a name: {spec!r} (NAME:k=v,k=v)")
    overrides, pairs = [], None
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"bench.sweep: {item!r} in variant {name!r} is not k=v")
        if key == "pairs":
            pairs = int(value)
        else:
            overrides.append(item)
    return name, overrides, pairs


def train_config(overrides: Sequence[str]) -> dict[str, Any]:
    from orchestrator.config import to_plain
    from orchestrator.submit import compose_config

    return to_plain(compose_config(["+experiment=self_reward", *overrides]).train)


def train_variant(pairs: list[dict[str, Any]], base: str, out: str, cfg: dict[str, Any], result_file: str) -> None:
    """In a child process, so each variant starts with a clean heap and its memory is returned."""
    from workers.trainer import TrainerWorker

    t0 = time.perf_counter()
    result = TrainerWorker(cfg.get("threads")).train(pairs, base, out, cfg, seed=0)
    Path(result_file).write_text(json.dumps({"steps": result["steps"], "metrics": result["metrics"],
                                             "wall_s": time.perf_counter() - t0}))


def evaluate(checkpoint: str, run_dir: Path, start_cache: Path | None, overrides: Sequence[str]) -> dict[str, float]:
    """``orchestrate-eval`` of one checkpoint; the start's answers come from ``start_cache`` when given."""
    if start_cache is not None and not (run_dir / "manifest.json").exists():
        (run_dir / "rounds" / "round_000").mkdir(parents=True, exist_ok=True)
        shutil.copy(start_cache, run_dir / "rounds" / "round_000" / GENERATIONS_FILE)
    resume = ["resume=true"] if (run_dir / "manifest.json").exists() else []
    cmd = [sys.executable, "-m", "orchestrator.eval.cli", f"model.path={checkpoint}", f"run_dir={run_dir}", *resume, *overrides]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads((run_dir / "rounds" / "round_001" / "eval.metrics.json").read_text())


def row(name: str, pairs: int, trained: dict[str, Any], ev: dict[str, float]) -> dict[str, Any]:
    m = trained["metrics"]
    return {
        "name": name, "pairs": pairs, "steps": trained["steps"], "train_s": m.get("train/train_s", trained["wall_s"]),
        "first_loss": m.get("train/first_loss"), "loss": m.get("train/loss"),
        "margin": m.get("train/last_rewards_margins", m.get("train/rewards_margins")),
        "winrate": ev.get("eval/vs_start/winrate"), "winrate_se": ev.get("eval/vs_start/winrate_se"),
        "if_acc": ev.get("eval/if/prompt_accuracy"), "if_delta": ev.get("eval/if/vs_start/prompt_accuracy_delta"),
        "if_delta_se": ev.get("eval/if/vs_start/prompt_accuracy_delta_se"),
        "identical": ev.get("eval/vs_start/identical_rate"), "tokens": ev.get("eval/response_tokens_mean"),
        "truncated": ev.get("eval/truncated_rate"),
    }


def table(rows: Sequence[dict[str, Any]], start: dict[str, float]) -> str:
    head = ["variant"] + [title for _, title, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| start | " + " | ".join(
        {"if_acc": f"{start.get('eval/if/prompt_accuracy', 0):.3f}", "tokens": f"{start.get('eval/response_tokens_mean', 0):.0f}",
         "truncated": f"{start.get('eval/truncated_rate', 0):.2f}"}.get(key, "") for key, _, _ in COLUMNS) + " |")
    for r in rows:
        cells = ["-" if r.get(key) is None else fmt.format(r[key]) for key, _, fmt in COLUMNS]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], out: Path, start: dict[str, float] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(6 + 1.2 * len(rows) * 3, 4))
    panels = [("winrate", "winrate_se", 50.0, "win rate vs start % (fixed judge, ±2 se)"),
              ("if_delta", "if_delta_se", 0.0, "IF prompt accuracy change (paired, ±2 se)"),
              ("tokens", None, (start or {}).get("eval/response_tokens_mean"), "mean answer tokens (dashed: the start)")]
    for ax, (key, se, ref, title) in zip(axes, panels):
        vals = [r.get(key) or 0.0 for r in rows]
        err = [2 * (r.get(se) or 0.0) for r in rows] if se else None
        ax.errorbar(range(len(rows)), vals, yerr=err, fmt="o", capsize=4, color="#4c72b0")
        ax.margins(x=0.2)
        if ref is not None:
            ax.axhline(ref, color="grey", lw=1, ls="--")
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", required=True, help="a train_pairs.jsonl (or pairs.jsonl) of a real round")
    ap.add_argument("--variant", action="append", required=True, help="NAME:k=v,k=v (train.* overrides, pairs=N)")
    ap.add_argument("--out", required=True, help="folder for checkpoints, eval runs, sweep.json, sweep.md, sweep.png")
    ap.add_argument("--eval", nargs="*", default=[], help="overrides for every orchestrate-eval (eval.max_prompts=32 ...)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bench.suite import default_model

    pairs = [json.loads(line) for line in Path(args.pairs).read_text().splitlines() if line.strip()]
    variants = [parse_variant(v) for v in args.variant]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = default_model()
    rows, start, start_cache = [], {}, None
    ctx = multiprocessing.get_context("spawn")
    for name, overrides, n in variants:
        use = pairs[:n] if n else pairs
        ckpt, result_file = out / "ckpt" / name, out / f"train_{name}.json"
        if not result_file.exists():
            print(f"== {name}: training on {len(use)} pairs with {overrides or 'the defaults'}", flush=True)
            proc = ctx.Process(target=train_variant, args=(use, base, str(ckpt), train_config(overrides), str(result_file)))
            proc.start()
            proc.join()
            if proc.exitcode != 0:
                raise SystemExit(f"bench.sweep: training {name} failed (exit {proc.exitcode})")
        trained = json.loads(result_file.read_text())
        print(f"== {name}: evaluating {ckpt}", flush=True)
        run_dir = out / "eval" / name
        ev = evaluate(str(ckpt), run_dir, start_cache, args.eval)
        start_cache = start_cache or run_dir / "rounds" / "round_000" / GENERATIONS_FILE
        start = start or json.loads((run_dir / "rounds" / "round_000" / "eval.metrics.json").read_text())
        rows.append(row(name, len(use), trained, ev) | {"overrides": overrides})
        (out / "sweep.json").write_text(json.dumps({"pairs_file": str(args.pairs), "start": start, "variants": rows}, indent=2) + "\n")
        (out / "sweep.md").write_text(table(rows, start) + "\n")
        plot(rows, out / "sweep.png", start)
        print(table(rows, start), flush=True)


if __name__ == "__main__":
    main()
