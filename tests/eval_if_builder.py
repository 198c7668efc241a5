"""A constructive solver for IF checks: builds a response that should satisfy a prompt's checks.

Used by tests/test_eval_ifeval.py to show every shipped prompt is satisfiable (the response it
builds passes every check of the prompt). Not part of the package.
"""

from __future__ import annotations

import json
from typing import Any

from orchestrator.eval import ifeval

POOL = (
    "the plan works well for most people today because simple steps help every team stay calm and "
    "focused during busy weeks while good habits build real progress over time with patience"
).split()


def _sentences(pool: list[str], k: int, start: int = 0) -> list[str]:
    out = []
    for i in range(k):
        ws = [pool[(start + i * 5 + j) % len(pool)] for j in range(5)]
        out.append(" ".join([ws[0].capitalize(), *ws[1:]]) + ".")
    return out


def _build(checks: dict[str, dict[str, Any]], k: int) -> str:
    banned = {w.lower() for w in checks.get("exclude_keywords", {}).get("keywords", [])}
    lf = checks.get("letter_frequency")
    pool = [w for w in POOL if w not in banned]
    if "keyword_frequency" in checks:
        pool = [w for w in pool if w != checks["keyword_frequency"]["keyword"].lower()]
    if lf and lf.get("at_most") is not None:
        pool = [w for w in pool if lf["letter"] not in w]
    if lf and lf.get("at_least"):
        with_letter = [w for w in ("zesty", "zone", "quiz", "jazz", "kind", "keep", "book", "vivid", "wave", "box", "fix", "very", "yes", "quick", "joy") if lf["letter"] in w]
        pool = (with_letter * 3 + pool) if with_letter else pool
    pieces: list[str] = []  # sentence-like units to distribute
    for kw in checks.get("include_keywords", {}).get("keywords", []):
        pieces.append(f"This covers {kw} clearly.")
    if "keyword_frequency" in checks:
        kf = checks["keyword_frequency"]
        times = kf.get("at_least") or 0
        inc = [w.lower() for w in checks.get("include_keywords", {}).get("keywords", [])]
        times -= inc.count(kf["keyword"].lower())
        pieces += [f"Think about {kf['keyword']} again."] * max(times, 0)
    for i in range(checks.get("highlight_count", {}).get("at_least", 0)):
        pieces.append(f"This is *point {i + 1}* here.")
    for i in range(checks.get("placeholder_count", {}).get("at_least", 0)):
        pieces.append(f"Write to [name {i + 1}] soon.")
    for i in range(checks.get("capital_words", {}).get("at_least") or 0):
        pieces.append(["Remember this NOW.", "It is VERY useful.", "Be CAREFUL here.", "This is KEY today.", "Stay ALERT always.", "Act FAST then."][i % 6])
    pieces += _sentences(pool, k)

    if "json_format" in checks:
        body = " ".join(pieces)
        text = json.dumps({"answer": body})
    else:
        nblocks = checks.get("paragraph_count", {}).get("n") or checks.get("section_count", {}).get("n") or 1
        blocks: list[list[str]] = [[] for _ in range(nblocks)]
        for i, piece in enumerate(pieces):
            blocks[i % nblocks].append(piece)
        for b in blocks:
            if not b:
                b.append(_sentences(pool, 1, start=7)[0])
        nb = checks.get("bullet_count", {}).get("n", 0)
        bullet_lines = [f"* {_sentences(pool, 1, start=3 + i)[0]}" for i in range(nb)]
        lines_per_block = [[" ".join(b)] for b in blocks]
        lines_per_block[-1] = lines_per_block[-1] + bullet_lines
        if "section_count" in checks:
            lines_per_block = [[f"SECTION {i + 1}"] + ls for i, ls in enumerate(lines_per_block)]
        head = []
        if "start_phrase" in checks:
            head.append(checks["start_phrase"]["phrase"])
        if "title" in checks:
            head.append("<<A Short Title>>")
        lines_per_block[0] = head + lines_per_block[0]
        if "postscript" in checks:
            lines_per_block[-1].append(f"{checks['postscript'].get('marker', 'P.S.')} Take care.")
        if "end_phrase" in checks:
            lines_per_block[-1].append(checks["end_phrase"]["phrase"])
        text = "\n\n".join("\n".join(ls) for ls in lines_per_block)
    if "lowercase" in checks:
        text = text.lower()
    if "uppercase" in checks:
        text = text.upper()
    if "quotation" in checks:
        text = f'"{text}"'
    return text


def build_response(item: dict[str, Any], max_k: int = 120) -> str | None:
    """A response passing every check of ``item``, or None if none of the tried sizes works."""
    checks = {c["kind"]: c.get("args", {}) for c in item["checks"]}
    for k in range(max_k):
        text = _build(checks, k)
        if all(ifeval.check_response(item, text)):
            return text
    return None
