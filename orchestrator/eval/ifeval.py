"""Verifiable instruction following, in the manner of IFEval (Zhou et al. 2023), no judge involved.

Each prompt in ``data/ifeval_prompts.jsonl`` carries 1-3 programmatic checks::

    {"id": "if-0001", "prompt": "...", "checks": [{"kind": "word_count", "args": {"at_least": 80}}]}

A check kind is a small function ``fn(response, **args) -> bool`` in ``CHECKS``; ``describe``
gives the instruction sentence(s) the prompt states for it, and ``validate_check`` refuses unknown
kinds, unknown or missing args and bad values. ``INCOMPATIBLE`` lists the kinds that cannot hold
together in one response; ``validate_item`` refuses a prompt that combines them.

Scoring follows IFEval: *strict* checks the response as it is; *loose* (optional) also accepts
the response with its first and/or last line removed and/or markdown ``*`` removed.
Conventions (stated in the prompts' instruction sentences):
- words are runs of letters/digits (with inner apostrophes or hyphens); counts are inclusive
  (``at_least`` / ``at_most``); ``n`` means exactly n;
- keywords match whole words, case-insensitively; start/end phrases compare case-insensitively
  after stripping surrounding whitespace;
- paragraphs are separated by blank lines or by a markdown divider line ``***``.
"""

from __future__ import annotations

import inspect
import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from orchestrator.store import read_jsonl

DATA_FILE = Path(__file__).resolve().parent / "data" / "ifeval_prompts.jsonl"

_WORD_RE = re.compile(r"[^\W_]+(?:['\u2019\-][^\W_]+)*")
_ABBREVIATIONS = re.compile(r"\b(?:P\.P\.S|P\.S|e\.g|i\.e|etc|Mr|Mrs|Ms|Dr|vs|St|a\.m|p\.m)\.", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]\u201d]*(?=\s|$)|\n+")
_DIVIDER_LINE = re.compile(r"^[ \t]*(?:\*[ \t]*){3,}$|^[ \t]*(?:-[ \t]*){3,}$", re.MULTILINE)
_BULLET_LINE = re.compile(r"^[ \t]*[*\-+\u2022][ \t]+\S", re.MULTILINE)
_HIGHLIGHT = re.compile(r"\*(?![\s*])[^\n*]*?[^\s*]\*")
_PLACEHOLDER = re.compile(r"\[[^\[\]\n]*[^\s\[\]][^\[\]\n]*\]")
_TITLE = re.compile(r"<<[^\n<>]*[^\s<>][^\n<>]*>>")
_SECTION_MARK = re.compile(r"(?<![^\W_])SECTION\s+(\d+)\b")
_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.DOTALL)


# -- text helpers --------------------------------------------------------------------------
def words(text: str) -> list[str]:
    return _WORD_RE.findall(text)


def sentences(text: str) -> list[str]:
    """Sentence-like segments: split after . ! ? (followed by space) and at line breaks."""
    protected = _ABBREVIATIONS.sub(lambda m: m.group(0).replace(".", "\u2024"), text)
    parts = _SENTENCE_END.split(protected)
    return [p.strip() for p in parts if words(p)]


def paragraphs(text: str) -> list[str]:
    """Chunks separated by blank lines or by a divider line of *** (or ---)."""
    marked = _DIVIDER_LINE.sub("\n\n", text.strip())
    return [p.strip() for p in re.split(r"\n\s*\n", marked) if p.strip()]


def _keyword_re(keyword: str) -> re.Pattern[str]:
    return re.compile(r"(?<![^\W_])" + re.escape(keyword.strip()) + r"(?![^\W_])", re.IGNORECASE)


def count_keyword(text: str, keyword: str) -> int:
    return len(_keyword_re(keyword).findall(text))


def _within(count: int, at_least: int | None, at_most: int | None) -> bool:
    return (at_least is None or count >= at_least) and (at_most is None or count <= at_most)


# -- checkers: fn(response, **args) -> bool --------------------------------------------------
def word_count(response: str, *, at_least: int | None = None, at_most: int | None = None) -> bool:
    return _within(len(words(response)), at_least, at_most)


def sentence_count(response: str, *, at_least: int | None = None, at_most: int | None = None) -> bool:
    return _within(len(sentences(response)), at_least, at_most)


def paragraph_count(response: str, *, n: int) -> bool:
    return len(paragraphs(response)) == n


def include_keywords(response: str, *, keywords: list[str]) -> bool:
    return all(count_keyword(response, k) > 0 for k in keywords)


def exclude_keywords(response: str, *, keywords: list[str]) -> bool:
    return bool(response.strip()) and all(count_keyword(response, k) == 0 for k in keywords)


def keyword_frequency(
    response: str, *, keyword: str, at_least: int | None = None, at_most: int | None = None
) -> bool:
    return _within(count_keyword(response, keyword), at_least, at_most)


def letter_frequency(response: str, *, letter: str, at_least: int | None = None, at_most: int | None = None) -> bool:
    return _within(response.lower().count(letter.lower()), at_least, at_most)


def bullet_count(response: str, *, n: int) -> bool:
    return len(_BULLET_LINE.findall(_DIVIDER_LINE.sub("", response))) == n


def json_format(response: str) -> bool:
    text = response.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def lowercase(response: str) -> bool:
    return any(c.isalpha() for c in response) and response == response.lower()


def uppercase(response: str) -> bool:
    return any(c.isalpha() for c in response) and response == response.upper()


def capital_words(response: str, *, at_least: int | None = None, at_most: int | None = None) -> bool:
    caps = [w for w in words(response) if len(w) >= 2 and any(c.isalpha() for c in w) and w == w.upper()]
    return _within(len(caps), at_least, at_most)


def start_phrase(response: str, *, phrase: str) -> bool:
    return response.strip().lower().startswith(phrase.strip().lower())


def end_phrase(response: str, *, phrase: str) -> bool:
    return response.strip().lower().endswith(phrase.strip().lower())


def title(response: str) -> bool:
    return bool(_TITLE.search(response))


def highlight_count(response: str, *, at_least: int) -> bool:
    return len(_HIGHLIGHT.findall(response)) >= at_least


def placeholder_count(response: str, *, at_least: int) -> bool:
    return len(_PLACEHOLDER.findall(response)) >= at_least


def postscript(response: str, *, marker: str = "P.S.") -> bool:
    pattern = r"^\s*" + re.escape(marker) + r"\s*\S"
    return bool(re.search(pattern, response, re.IGNORECASE | re.MULTILINE))


def no_commas(response: str) -> bool:
    return bool(response.strip()) and "," not in response and "\uff0c" not in response


def quotation(response: str) -> bool:
    text = response.strip()
    return len(text) > 2 and text[0] in "\"\u201c" and text[-1] in "\"\u201d"


def section_count(response: str, *, n: int) -> bool:
    """Exactly ``n`` sections marked SECTION 1 .. SECTION n (in order, each with some text)."""
    marks = list(_SECTION_MARK.finditer(response))
    if [int(m.group(1)) for m in marks] != list(range(1, n + 1)):
        return False
    bodies = [response[m.end() : (marks[i + 1].start() if i + 1 < len(marks) else len(response))] for i, m in enumerate(marks)]
    return all(words(b) for b in bodies)


def ascii_only(response: str) -> bool:
    return bool(response.strip()) and all(ord(c) < 128 for c in response)


# -- the registry --------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    kind: str
    fn: Callable[..., bool]
    describe: Callable[..., list[str]]  # instruction phrasings for given args; [0] is canonical


def _q(words_: Iterable[str]) -> str:
    items = [f'"{w}"' for w in words_]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _q_or(words_: Iterable[str]) -> str:
    items = [f'"{w}"' for w in words_]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def _n(count: int, noun: str) -> str:
    """``3 words`` / ``1 word`` (nouns are given in the plural)."""
    return f"{count} {noun if count != 1 else noun.replace('words', 'word').replace('times', 'time').replace('sentences', 'sentence')}"


def _range(noun: str, at_least: int | None, at_most: int | None) -> list[str]:
    if at_least is not None and at_most is not None:
        return [f"between {at_least} and {at_most} {noun}"]
    if at_least is not None:
        return [f"at least {_n(at_least, noun)}"]
    return [f"at most {_n(at_most, noun)}", f"no more than {_n(at_most, noun)}"]


def _d_word_count(at_least=None, at_most=None):
    r = _range("words", at_least, at_most)
    return [f"Your response should contain {r[0]}.", *(f"Answer with {x}." for x in r)]


def _d_sentence_count(at_least=None, at_most=None):
    r = _range("sentences", at_least, at_most)
    return [f"Your response should contain {r[0]} (each line counts as a sentence).", *(f"Write {x} (each line counts as a sentence)." for x in r)]


def _d_paragraph_count(n):
    return [
        f"There should be exactly {n} paragraphs, separated from each other by the markdown divider ***.",
        f"Your answer must consist of exactly {n} paragraphs separated by blank lines.",
    ]


def _d_include(keywords):
    kw, w = ("keyword", "word") if len(keywords) == 1 else ("keywords", "words")
    verb = "appears" if len(keywords) == 1 else "appear"
    return [f"Include the {kw} {_q(keywords)} in your response.", f"Make sure the {w} {_q(keywords)} {verb} in your answer."]


def _d_exclude(keywords):
    w = "word" if len(keywords) == 1 else "words"
    return [f"Do not use the {w} {_q_or(keywords)} anywhere in your response.", f"Avoid the {w} {_q_or(keywords)} completely."]


def _d_keyword_frequency(keyword, at_least=None, at_most=None):
    if at_most == 0 and not at_least:
        return [f'Do not use the word "{keyword}" at all.']
    r = _range("times", at_least, at_most)
    return [f'The word "{keyword}" should appear {r[0]}.', *(f'Use the word "{keyword}" {x}.' for x in r)]


def _d_letter_frequency(letter, at_least=None, at_most=None):
    if at_most == 0 and not at_least:
        return [f'Do not use the letter "{letter}" at all.']
    r = _range("times", at_least, at_most)
    return [f'The letter "{letter}" should appear {r[0]} in your response.', *(f'Use the letter "{letter}" {x}.' for x in r)]


def _d_bullet_count(n):
    point = "point" if n == 1 else "points"
    return [
        f'Your answer must contain exactly {n} bullet {point} in markdown format, each on its own line starting with "* ".',
        f'Use exactly {n} markdown bullet {point} (lines starting with "* ").',
    ]


def _d_json():
    return ["Format your entire response as a single valid JSON object.", "Wrap your whole answer in JSON: the output must be one valid JSON object."]


def _d_lowercase():
    return ["Your entire response should be in English and in lowercase letters; no capital letters are allowed.", "Write everything in lowercase letters only, with no capital letters at all."]


def _d_uppercase():
    return ["Your entire response should be in English and in capital letters only.", "Write your whole answer in capital letters only."]


def _d_capital_words(at_least=None, at_most=None):
    r = _range("words written entirely in capital letters", at_least, at_most)
    return [f"Use {r[0]}.", *(f"Include {x}." for x in r)]


def _d_start(phrase):
    return [f'Begin your response with the exact words "{phrase}".', f'Start your answer with "{phrase}".']


def _d_end(phrase):
    return [f'Finish your response with the exact phrase "{phrase}". No other words should follow it.', f'End your answer with the exact words "{phrase}", with nothing after them.']


def _d_title():
    return ["Give your answer a title wrapped in double angular brackets, such as <<my title>>.", "Include a title in double angular brackets, like <<title>>."]


def _d_highlight(at_least):
    s = "section" if at_least == 1 else "sections"
    return [f"Highlight at least {at_least} {s} of your answer with markdown, i.e. *highlighted section*.", f"Mark at least {at_least} {s} with single asterisks, like *this part*."]


def _d_placeholder(at_least):
    s = "placeholder" if at_least == 1 else "placeholders"
    return [f"Include at least {at_least} {s} in square brackets, such as [address].", f"The response must contain at least {at_least} {s} written in square brackets, like [name]."]


def _d_postscript(marker="P.S."):
    return [f"At the end of your response, add a postscript starting with {marker}", f"End with a postscript that begins with {marker}"]


def _d_no_commas():
    return ["Do not use any commas in your response.", "Your entire answer must contain no commas."]


def _d_quotation():
    return ["Wrap your entire response in double quotation marks.", 'Put your whole answer inside double quotes (").']


def _d_sections(n):
    return [
        f"Your response must have exactly {n} sections. Mark the beginning of each section with SECTION X, such as: SECTION 1.",
        f"Divide your answer into exactly {n} sections, each starting with SECTION X (SECTION 1, SECTION 2, ...).",
    ]


def _d_ascii():
    return ["Respond in English only, using plain ASCII characters (no emoji, accents or special symbols).", "Use only plain English ASCII characters: no emoji, accented letters or special symbols."]


CHECKS: dict[str, Check] = {
    c.kind: c
    for c in [
        Check("word_count", word_count, _d_word_count),
        Check("sentence_count", sentence_count, _d_sentence_count),
        Check("paragraph_count", paragraph_count, _d_paragraph_count),
        Check("include_keywords", include_keywords, _d_include),
        Check("exclude_keywords", exclude_keywords, _d_exclude),
        Check("keyword_frequency", keyword_frequency, _d_keyword_frequency),
        Check("letter_frequency", letter_frequency, _d_letter_frequency),
        Check("bullet_count", bullet_count, _d_bullet_count),
        Check("json_format", json_format, _d_json),
        Check("lowercase", lowercase, _d_lowercase),
        Check("uppercase", uppercase, _d_uppercase),
        Check("capital_words", capital_words, _d_capital_words),
        Check("start_phrase", start_phrase, _d_start),
        Check("end_phrase", end_phrase, _d_end),
        Check("title", title, _d_title),
        Check("highlight_count", highlight_count, _d_highlight),
        Check("placeholder_count", placeholder_count, _d_placeholder),
        Check("postscript", postscript, _d_postscript),
        Check("no_commas", no_commas, _d_no_commas),
        Check("quotation", quotation, _d_quotation),
        Check("section_count", section_count, _d_sections),
        Check("ascii_only", ascii_only, _d_ascii),
    ]
}

# Kinds that cannot hold together in one response (or only in contrived ways); symmetric.
_INCOMPATIBLE_PAIRS = [
    ("lowercase", "uppercase"),
    ("lowercase", "capital_words"),
    ("uppercase", "capital_words"),
    ("lowercase", "section_count"),  # SECTION is upper case
    ("paragraph_count", "section_count"),
    ("quotation", "start_phrase"),
    ("quotation", "end_phrase"),
    ("quotation", "postscript"),
    ("quotation", "json_format"),
    *(
        ("json_format", k)
        for k in (
            "bullet_count", "paragraph_count", "section_count", "sentence_count", "title", "start_phrase",
            "end_phrase", "postscript", "no_commas", "highlight_count",
        )
    ),
]
INCOMPATIBLE: frozenset[frozenset[str]] = frozenset(frozenset(p) for p in _INCOMPATIBLE_PAIRS)


# -- validation --------------------------------------------------------------------------
def _params(kind: str) -> dict[str, inspect.Parameter]:
    sig = inspect.signature(CHECKS[kind].fn)
    return {name: p for name, p in list(sig.parameters.items())[1:]}


def validate_check(kind: str, args: Mapping[str, Any]) -> None:
    """Raise ValueError unless ``kind`` is known and ``args`` fit its checker."""
    if kind not in CHECKS:
        raise ValueError(f"unknown check kind {kind!r} (known: {', '.join(sorted(CHECKS))})")
    params = _params(kind)
    unknown = set(args) - set(params)
    if unknown:
        raise ValueError(f"{kind}: unknown args {sorted(unknown)} (takes {sorted(params)})")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in args]
    if missing:
        raise ValueError(f"{kind}: missing args {missing}")
    for name in ("at_least", "at_most", "n"):
        if name in args and args[name] is not None and (not isinstance(args[name], int) or args[name] < 0):
            raise ValueError(f"{kind}: {name} must be a non-negative integer, got {args[name]!r}")
    if "at_least" in params and "n" not in params and "at_most" in params:
        lo, hi = args.get("at_least"), args.get("at_most")
        if lo is None and hi is None:
            raise ValueError(f"{kind}: give at_least and/or at_most")
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"{kind}: at_least {lo} > at_most {hi}")
    if kind in ("paragraph_count", "section_count", "bullet_count") and args["n"] < 1:
        raise ValueError(f"{kind}: n must be >= 1")
    if "keywords" in args:
        kws = args["keywords"]
        if not isinstance(kws, list) or not kws or not all(isinstance(k, str) and k.strip() for k in kws):
            raise ValueError(f"{kind}: keywords must be a non-empty list of non-empty strings")
    for name in ("keyword", "phrase", "marker"):
        if name in args and (not isinstance(args[name], str) or not args[name].strip()):
            raise ValueError(f"{kind}: {name} must be a non-empty string")
    if kind == "letter_frequency" and (not isinstance(args["letter"], str) or len(args["letter"]) != 1 or not args["letter"].isalpha()):
        raise ValueError(f"{kind}: letter must be a single letter, got {args['letter']!r}")


def validate_item(item: Mapping[str, Any]) -> None:
    """Raise ValueError unless the prompt's checks are valid, distinct kinds, compatible and stated."""
    ident = item.get("id", "?")
    if not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
        raise ValueError(f"{ident}: empty prompt")
    checks = item.get("checks")
    if not isinstance(checks, list) or not checks:
        raise ValueError(f"{ident}: no checks")
    kinds = [c.get("kind") for c in checks]
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"{ident}: a check kind appears twice: {kinds}")
    for check in checks:
        try:
            validate_check(check.get("kind"), check.get("args", {}))
        except ValueError as exc:
            raise ValueError(f"{ident}: {exc}") from None
        if not any(p in item["prompt"] for p in describe(check["kind"], check.get("args", {}))):
            raise ValueError(f"{ident}: the prompt does not state its {check['kind']} instruction")
    for i, a in enumerate(kinds):
        for b in kinds[i + 1 :]:
            if frozenset((a, b)) in INCOMPATIBLE:
                raise ValueError(f"{ident}: checks {a} and {b} cannot be satisfied together")
    args = {c["kind"]: c.get("args", {}) for c in checks}
    banned = {k.lower() for k in args.get("exclude_keywords", {}).get("keywords", [])}
    wanted = {k.lower() for k in args.get("include_keywords", {}).get("keywords", [])}
    if "keyword_frequency" in args and args["keyword_frequency"].get("at_least"):
        wanted.add(args["keyword_frequency"]["keyword"].lower())
    for kind in ("start_phrase", "end_phrase"):
        if kind in args:
            wanted.update(w.lower() for w in words(args[kind]["phrase"]))
            if "no_commas" in args and "," in args[kind]["phrase"]:
                raise ValueError(f"{ident}: {kind} has a comma but no_commas is required")
    if banned & wanted:
        raise ValueError(f"{ident}: words both required and forbidden: {sorted(banned & wanted)}")


def describe(kind: str, args: Mapping[str, Any]) -> list[str]:
    """Instruction phrasings for one check; a prompt states one of them verbatim."""
    return CHECKS[kind].describe(**args)


def run_check(kind: str, args: Mapping[str, Any], response: str) -> bool:
    return bool(CHECKS[kind].fn(response, **args))


def _loose_variants(response: str) -> list[str]:
    lines = response.split("\n")
    cut = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return [v for c in cut for v in (c, c.replace("*", ""))]


def check_response(item: Mapping[str, Any], response: str, loose: bool = False) -> list[bool]:
    """One bool per check of ``item`` (strict; loose: any IFEval loose variant passes)."""
    variants = _loose_variants(response) if loose else [response]
    return [
        any(run_check(c["kind"], c.get("args", {}), v) for v in variants if v.strip())
        for c in item["checks"]
    ]


# -- the shipped set and scoring ----------------------------------------------------------
def load_items(path: str | Path | None = None, max_prompts: int | None = None) -> list[dict[str, Any]]:
    """The IF prompts (validated); the first ``max_prompts`` in file order when given."""
    items = read_jsonl(Path(path) if path else DATA_FILE)
    ids = set()
    for item in items:
        validate_item(item)
        if item["id"] in ids:
            raise ValueError(f"duplicate IF prompt id {item['id']}")
        ids.add(item["id"])
    return items[:max_prompts] if max_prompts else items


def evaluate_if(
    responses: Mapping[str, str], items: list[Mapping[str, Any]], loose: bool = False
) -> dict[str, float]:
    """IFEval metrics for the items that have a response.

    ``if/prompt_accuracy``: share of prompts whose every check passes; ``if/check_accuracy``:
    share of all checks that pass; ``if/kind/<kind>``: per-kind check accuracy; ``if/prompts``.
    With ``loose=True`` the same keys under ``if_loose/``.
    """
    prefix = "if_loose" if loose else "if"
    per_prompt: list[bool] = []
    per_check: list[bool] = []
    per_kind: dict[str, list[bool]] = {}
    for item in items:
        if item["id"] not in responses:
            continue
        results = check_response(item, responses[item["id"]] or "", loose=loose)
        per_prompt.append(all(results))
        per_check.extend(results)
        for check, ok in zip(item["checks"], results):
            per_kind.setdefault(check["kind"], []).append(ok)
    metrics = {f"{prefix}/prompts": float(len(per_prompt))}
    if per_prompt:
        metrics[f"{prefix}/prompt_accuracy"] = statistics.fmean(per_prompt)
        metrics[f"{prefix}/check_accuracy"] = statistics.fmean(per_check)
        for kind, oks in sorted(per_kind.items()):
            metrics[f"{prefix}/kind/{kind}"] = statistics.fmean(oks)
    return metrics


def paired_delta(now: Sequence[bool], start: Sequence[bool], *, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Mean of ``now - start`` over the same prompts and its paired-bootstrap standard error.

    Paired because both answer sets are graded on the same prompts: resampling prompts (not the
    two accuracies apart) keeps the per-prompt correlation, so the SE of a small change is honest.
    """
    import numpy as np

    if len(now) != len(start) or not now:
        raise ValueError(f"paired_delta: {len(now)} and {len(start)} results; need the same non-zero count")
    diff = np.asarray(now, dtype=float) - np.asarray(start, dtype=float)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(resamples, diff.size))].mean(axis=1)
    return float(diff.mean()), float(means.std(ddof=1))

