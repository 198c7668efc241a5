"""``python -m bench.judge_power``: can the eval's fixed judge tell a better answer from a worse one?

The per-round eval's win rate is only as sensitive as its judge. This probe asks the fixed judge
(``eval.judge``; by default the starting model) the eval's own pairwise question, both orders, on
the held-out prompts, with pairs whose winner is known: the starting model's greedy answer against
a version of it that is worse by construction.

- ``refusal``: a content-free refusal ("I'm sorry, but I can't help with that.");
- ``off_topic``: the starting model's answer to another held-out prompt (fluent, irrelevant);
- ``truncated``: the answer's first eight words;
- ``shuffled``: the answer's words in a random order (the same words, no sentences).

For each it prints the win rate of the real answer (soft and hard, as ``eval.pairwise.mode``) with
its standard error, how often both orders pick the real answer, and the judge's position consistency
and bias (``pairwise.position_stats``).
A judge that cannot prefer a real answer to a refusal by more than its noise cannot show a round's
smaller improvements either. ``--answers FILE`` adds the pairs of a run's round against the start
(``RUN/rounds/round_00R/eval_generations.jsonl``), the eval's own vs_start comparison::

    python -m bench.judge_power --out judge_power.json
    python -m bench.judge_power --set eval.judge.model=/path/to/judge
    python -m bench.judge_power --controls --answers RUN/rounds/round_003/eval_generations.jsonl

Config overrides (``--set k=v``) apply over ``+experiment=self_reward``. The starting model's answers
go through the eval's shared answer cache, so a run that already evaluated the start reuses them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

REFUSAL = "I'm sorry, but I can't help with that."
TRUNCATE_WORDS = 8


def refusal(answers: Sequence[str], rng: random.Random) -> list[str]:
    return [REFUSAL for _ in answers]


def off_topic(answers: Sequence[str], rng: random.Random) -> list[str]:
    """Each prompt gets the answer to the next prompt (a rotation: nobody keeps their own)."""
    return list(answers[1:]) + list(answers[:1])


def truncated(answers: Sequence[str], rng: random.Random) -> list[str]:
    return [" ".join(a.split()[:TRUNCATE_WORDS]) for a in answers]


def shuffled(answers: Sequence[str], rng: random.Random) -> list[str]:
    out = []
    for a in answers:
        words = a.split()
        rng.shuffle(words)
        out.append(" ".join(words))
    return out


CONTROLS: dict[str, Callable[[Sequence[str], random.Random], list[str]]] = {
    "refusal": refusal, "off_topic": off_topic, "truncated": truncated, "shuffled": shuffled,
}


def power_row(verdicts: Sequence[Any]) -> dict[str, float]:
    """Win rates of the first side (the model) over the pairs the judge answered, soft and hard, how
    often both orders pick the model, and the judge's position consistency and bias (P(Output (a)))."""
    from orchestrator.eval import pairwise
    from orchestrator.eval.lc_winrate import raw_winrate

    judged = [v for v in verdicts if not v.identical]
    soft = [p for v in judged if (p := pairwise.combine(v.p_model_first, v.p_model_second, "soft")) is not None]
    hard = [p for v in judged if (p := pairwise.combine(v.p_model_first, v.p_model_second, "hard")) is not None]
    wr, se = raw_winrate(soft)
    hwr, hse = raw_winrate(hard)
    both = [v for v in judged if v.p_model_first is not None and v.p_model_second is not None]
    return {
        "pairs": float(len(verdicts)), "judged": float(len(soft)),
        "winrate": wr, "winrate_se": se, "z": (wr - 50.0) / se if se else float("nan"),
        "hard_winrate": hwr, "hard_winrate_se": hse,
        # Both orders pick the model: the judge saw the difference wherever it was put.
        "both_orders_agree": sum(v.p_model_first > 0.5 and v.p_model_second > 0.5 for v in both) / len(both) if both else float("nan"),
        "position_consistency": float("nan"), "p_first": float("nan"),
        **pairwise.position_stats(verdicts),
    }


def start_answers(cfg: Any, model: str, prompts: Sequence[Any]) -> tuple[list[str], float]:
    """The starting model's greedy answers to ``prompts`` with the eval's decoding and the policy's
    engine, through the eval's shared answer cache; (answers, seconds spent generating)."""
    from orchestrator.config import to_plain
    from orchestrator.eval.answer_cache import answer_cache
    from orchestrator.eval.generations import Response, generate_cached, wanted
    from orchestrator.eval.loop import computing
    from orchestrator.models import checkpoint_fingerprint
    from orchestrator.section import Section
    from orchestrator.store import RoundDir
    from workers.vllm_worker import VLLMWorker

    ev = Section("eval", to_plain(cfg.eval))
    engine = to_plain(cfg.generation.engine)
    shared = answer_cache(ev, checkpoint_fingerprint(model), computing(engine))
    want = wanted(prompts, [])
    cached = shared.lookup([m for _, m in want], Response) if shared is not None else [None] * len(want)
    t0 = time.perf_counter()
    # The engine starts only when some answer is not in the cache.
    worker = VLLMWorker(model, engine, int(cfg.seed)) if any(c is None for c in cached) else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rdir = RoundDir(Path(tmp), 0)
            rdir.path.mkdir(parents=True)
            responses, _, _ = generate_cached(worker, rdir, want, ev["decoding"], shared=shared)
    finally:
        if worker is not None:
            worker.shutdown()
    return [responses[k].text for k, _ in want], time.perf_counter() - t0


def read_answers(path: str) -> dict[str, str]:
    """A round's held-out answers by prompt id, from its ``eval_generations.jsonl``."""
    from orchestrator.eval.generations import HELD_OUT, Response
    from orchestrator.store import read_jsonl

    return {r.prompt_id: r.text for r in read_jsonl(Path(path), Response) if r.set == HELD_OUT}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from orchestrator.config import to_plain
    from orchestrator.eval import pairwise
    from orchestrator.eval.compare import judge_instructions
    from orchestrator.eval.generations import load_eval_prompts
    from orchestrator.eval.loop import judge_checkpoint, judge_engine
    from orchestrator.models import resolve_model_path
    from orchestrator.section import Section
    from orchestrator.submit import compose_config
    from workers.vllm_worker import VLLMWorker

    cfg = compose_config(["+experiment=self_reward", *args.set])
    if cfg.eval.judge.endpoint.base_url:
        raise SystemExit("bench.judge_power probes a local judge engine; eval.judge.endpoint.base_url is set")
    ev = Section("eval", to_plain(cfg.eval))
    prompts = load_eval_prompts(ev)
    model = resolve_model_path(cfg.model)
    answers, gen_s = start_answers(cfg, model, prompts)
    instructions = judge_instructions([p.messages for p in prompts])
    rng = random.Random(args.seed)
    pairs: dict[str, tuple[list[str], list[str]]] = {name: (answers, CONTROLS[name](answers, rng)) for name in args.controls}
    for path in args.answers:
        theirs = read_answers(path)
        missing = [p.id for p in prompts if p.id not in theirs]
        if missing:
            raise SystemExit(f"{path}: no answer to {len(missing)} of the held-out prompts (e.g. {missing[0]})")
        pairs[f"answers:{path}"] = ([theirs[p.id] for p in prompts], answers)

    judge = judge_checkpoint(str(cfg.eval.judge.model), model)
    pw = to_plain(cfg.eval.pairwise)
    report: dict[str, Any] = {"model": model, "judge": judge, "prompts": len(prompts), "start_answers_s": gen_s,
                              "pairwise": pw, "comparisons": {}}
    worker = VLLMWorker(judge, judge_engine(cfg), int(cfg.seed))
    try:
        for name, (mine, theirs) in pairs.items():
            t0 = time.perf_counter()
            verdicts = pairwise.judge_pairs(worker, instructions, mine, theirs, pw)
            report["comparisons"][name] = {**power_row(verdicts), "judge_s": time.perf_counter() - t0,
                                           "verdicts": [[v.p_model_first, v.p_model_second] for v in verdicts]}
            print(line(name, report["comparisons"][name]), flush=True)
    finally:
        worker.shutdown()
    return report


def line(name: str, r: Mapping[str, float]) -> str:
    return (f"{name:>10}: model wins {r['winrate']:5.1f} ± {r['winrate_se']:.1f} % (z {r['z']:+.1f}), hard {r['hard_winrate']:5.1f} "
            f"± {r['hard_winrate_se']:.1f} %, both orders pick the model {r['both_orders_agree']:.0%}, "
            f"consistent in {r['position_consistency']:.0%}, P(first output) {r['p_first']:.2f}, "
            f"{r['judged']:.0f}/{r['pairs']:.0f} pairs judged")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.judge_power", description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, as on the orchestrate command line")
    ap.add_argument("--answers", nargs="*", default=[], metavar="FILE",
                    help="a round's eval_generations.jsonl: its held-out answers against the start's")
    ap.add_argument("--controls", nargs="*", choices=list(CONTROLS), default=list(CONTROLS), help="which known-worse answers (default: all)")
    ap.add_argument("--seed", type=int, default=0, help="the word shuffle's seed")
    ap.add_argument("--out", default="judge_power.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    report = run(args)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
