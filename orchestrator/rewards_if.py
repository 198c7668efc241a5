"""The verifiable instruction-following reward (``judge=verifiable``) and its training prompts.

Training prompts are a base question plus 1-2 checkable constraints stated with the eval's own
instruction sentences (``ifeval.describe``), in the eval's file format::

    {"id": "ift-0001", "prompt": "<base> <instruction> ...", "checks": [...], "base": "<base>", "category": "if"}

so ``data.prompts`` reads them as prompts and ``if_reward`` reads their checks. They never overlap
the held-out IF eval set (orchestrator/eval/data/ifeval_prompts.jsonl): the bases are the shipped
seed prompts (training data already) minus any whose text is, or nearly is, an eval base
question, so neither a prompt text nor a (base question, constraint kind) combination of the eval
is ever trained on. ``orchestrator/data/if_train_prompts.jsonl`` is ``generate(480, seed=0)``;
``python -m orchestrator.rewards_if --n 480 --seed 0 --out FILE`` writes another.

``if_reward(messages, response)`` looks the prompt up by its text in the specs file and returns the
share of its checks the response passes (``score=fraction``, a dense signal for pairs) or 1/0 for
all of them (``score=all``, the eval's prompt accuracy); ``None`` for a prompt with no checks there
(a Self-Instruct prompt), which leaves the response unscored, or in a hybrid, judged by the LLM alone.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from orchestrator.errors import ConfigError
from orchestrator.eval import ifeval
from orchestrator.store import read_jsonl

TRAIN_FILE = Path(__file__).resolve().parent / "data" / "if_train_prompts.jsonl"
# Questions that suit a stated format; coding and maths answers fight constraints like "no commas".
BASE_CATEGORIES = ("writing", "advice", "facts", "reasoning")
# Bases this similar (word Jaccard) to an eval base are left out too: a reworded eval question
# with the same constraint would leak what the eval measures.
NEAR_DUPLICATE = 0.6

_GENERIC_WORDS = ["example", "simple", "important", "daily", "careful", "future", "reason", "small", "clear", "people"]
_START = ["Here is my answer:", "Great question.", "To begin", "Let me explain.", "In short"]
_END = ["Hope this helps.", "Thank you for reading.", "That covers the main points.", "Let me know if you have questions."]


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", text.lower()))


def base_of(item: Mapping[str, Any]) -> str:
    """An IF prompt's base question: its text without the instruction sentences its checks state."""
    text = item["prompt"]
    for check in item["checks"]:
        for phrase in ifeval.describe(check["kind"], check.get("args", {})):
            text = text.replace(phrase, "")
    return " ".join(text.split())


def eval_keys(items: Iterable[Mapping[str, Any]]) -> tuple[set[str], set[str], set[tuple[str, str]]]:
    """(prompt texts, base questions, (base, kind) combinations) of IF items, normalised."""
    items = list(items)
    texts = {normalise(it["prompt"]) for it in items}
    bases = {normalise(base_of(it)) for it in items}
    combos = {(normalise(base_of(it)), c["kind"]) for it in items for c in it["checks"]}
    return texts, bases, combos


def _similar(a: str, b: str) -> float:
    wa, wb = _words(a), _words(b)
    return len(wa & wb) / len(wa | wb) if wa | wb else 1.0


def candidate_bases(eval_items: Sequence[Mapping[str, Any]], extra_held_out: Iterable[str] = ()) -> list[str]:
    """Seed prompts of ``BASE_CATEGORIES`` that are neither an eval base nor near one (nor in ``extra_held_out``)."""
    _, eval_bases, _ = eval_keys(eval_items)
    held = list(eval_bases) + [normalise(t) for t in extra_held_out]
    seeds = [row for row in read_jsonl(_seed_file()) if row.get("category") in BASE_CATEGORIES]
    return [row["prompt"] for row in seeds
            if all(_similar(normalise(row["prompt"]), h) < NEAR_DUPLICATE for h in held)]


def _seed_file() -> Path:
    from orchestrator.data import seed_prompts_path

    return seed_prompts_path()


def _content_word(base: str, rng: random.Random) -> str | None:
    words = [w for w in re.findall(r"[A-Za-z]+", base) if len(w) >= 5]
    return rng.choice(words).lower() if words else None


def _args(kind: str, base: str, rng: random.Random) -> dict[str, Any] | None:
    """Arguments for one check of ``kind`` on ``base``, in the ranges the eval uses."""
    if kind in ("word_count", "sentence_count", "capital_words"):
        if kind == "word_count":
            return rng.choice([{"at_most": rng.choice([50, 80, 120])}, {"at_least": rng.choice([40, 60, 100])}])
        if kind == "sentence_count":
            return rng.choice([{"at_most": rng.randint(2, 5)}, {"at_least": rng.randint(3, 6)}])
        return {"at_least": rng.randint(2, 4)}
    if kind in ("paragraph_count", "section_count"):
        return {"n": rng.randint(2, 4)}
    if kind == "bullet_count":
        return {"n": rng.randint(2, 5)}
    if kind == "include_keywords":
        return {"keywords": rng.sample(_GENERIC_WORDS, rng.randint(1, 2))}
    if kind == "exclude_keywords":
        word = _content_word(base, rng)
        return {"keywords": [word]} if word else None
    if kind == "keyword_frequency":
        return {"keyword": rng.choice(_GENERIC_WORDS), "at_least": rng.randint(2, 3)}
    if kind == "letter_frequency":
        return rng.choice([{"letter": rng.choice("zqxj"), "at_most": 0}, {"letter": rng.choice("kwybv"), "at_least": rng.randint(3, 6)}])
    if kind == "start_phrase":
        return {"phrase": rng.choice(_START)}
    if kind == "end_phrase":
        return {"phrase": rng.choice(_END)}
    if kind == "highlight_count":
        return {"at_least": rng.randint(1, 3)}
    if kind == "placeholder_count":
        return {"at_least": rng.randint(1, 2)}
    if kind == "postscript":
        return {"marker": rng.choice(["P.S.", "P.P.S"])}
    return {}  # json_format, lowercase, uppercase, title, no_commas, quotation, ascii_only


def generate(
    n: int, seed: int = 0, eval_items: Sequence[Mapping[str, Any]] | None = None, max_checks: int = 2,
    extra_held_out: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """``n`` valid IF training prompts, none of whose text, base question or (base, kind) is in ``eval_items``
    (default: the shipped IF eval set). Deterministic for a seed."""
    eval_items = list(ifeval.load_items() if eval_items is None else eval_items)
    texts, eval_bases, combos = eval_keys(eval_items)
    bases = candidate_bases(eval_items, extra_held_out)
    if not bases:
        raise ConfigError("no seed prompt is free to use as an IF training base (all are near eval bases)")
    rng = random.Random(seed)
    kinds = sorted(ifeval.CHECKS)
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n:
            raise ConfigError(f"could only make {len(out)} of {n} distinct IF training prompts")
        base = rng.choice(bases)
        k = 1 if rng.random() < 0.5 else min(2, max_checks)
        checks = []
        for kind in rng.sample(kinds, k):
            args = _args(kind, base, rng)
            if args is None or (normalise(base), kind) in combos:
                break
            checks.append({"kind": kind, "args": args})
        else:
            sentences = [rng.choice(ifeval.describe(c["kind"], c["args"])) for c in checks]
            prompt = " ".join([base, *sentences])
            item = {"id": f"ift-{len(out) + 1:04d}", "prompt": prompt, "checks": checks, "base": base, "category": "if"}
            try:
                ifeval.validate_item(item)
            except ValueError:
                continue  # an incompatible pair of kinds, or args that clash: draw again
            key = normalise(prompt)
            if key in seen or key in texts or normalise(base) in eval_bases:
                continue
            seen.add(key)
            out.append(item)
    return out


@functools.lru_cache(maxsize=8)
def _index(path: str) -> dict[str, list[dict[str, Any]]]:
    """Checks by normalised prompt text, from a specs file; refuses one that holds an eval IF prompt."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"judge.function_kwargs.specs={path!r}: no such file")
    items = read_jsonl(file)
    for item in items:
        try:
            ifeval.validate_item(item)
        except ValueError as exc:
            raise ConfigError(f"judge.function_kwargs.specs={path!r}: {exc}") from None
    texts, _, combos = eval_keys(ifeval.load_items())
    leaked = [it["id"] for it in items if normalise(it["prompt"]) in texts
              or any((normalise(base_of(it)), c["kind"]) in combos for c in it["checks"])]
    if leaked:
        raise ConfigError(
            f"judge.function_kwargs.specs={path!r} holds held-out IF eval prompts or their (question, constraint) "
            f"combinations ({', '.join(leaked[:3])}...); training on them would void the IF eval"
        )
    return {normalise(it["prompt"]): it["checks"] for it in items}


def if_reward(messages: Sequence[Mapping[str, str]], response: str, *, specs: str | None = None,
              score: str = "fraction", loose: bool = False) -> float | None:
    """Share of the prompt's checks ``response`` passes (``score=all``: 1.0 only if every one does);
    None when the prompt (its last user turn) has no checks in ``specs`` (default: the shipped file)."""
    if score not in ("fraction", "all"):
        raise ConfigError(f"judge.function_kwargs.score={score!r} is invalid: one of fraction, all")
    checks = _index(str(specs or TRAIN_FILE)).get(normalise(_last_user(messages)))
    if checks is None:
        return None
    results = ifeval.check_response({"checks": checks}, response, loose=loose)
    if score == "all":
        return float(all(results))
    return sum(results) / len(results)


def _last_user(messages: Sequence[Mapping[str, str]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            return str(m.get("content", ""))
    return ""


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write IF training prompts (never overlapping the IF eval set).")
    ap.add_argument("--n", type=int, default=480)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-checks", type=int, default=2)
    ap.add_argument("--out", default=str(TRAIN_FILE))
    args = ap.parse_args(argv)
    items = generate(args.n, args.seed, max_checks=args.max_checks)
    Path(args.out).write_text("".join(json.dumps(it) + "\n" for it in items), encoding="utf-8")
    print(f"{len(items)} IF training prompts ({len({it['base'] for it in items})} base questions) -> {args.out}")


if __name__ == "__main__":
    main()
