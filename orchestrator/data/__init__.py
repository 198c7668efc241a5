"""Prompt sets: the seed prompts shipped with the package, the held-out eval prompts, and a loader.

``seed_prompts.jsonl`` (240 prompts) feeds the rounds; ``eval_prompts.jsonl`` (120 prompts) is
held out to measure whether rounds improved the policy and is never used for training;
``dev_prompts.jsonl`` (42 prompts) is the development set ExPO chooses its alpha on. All have
one ``{"id", "prompt", "category"}`` object per line (``load_prompts`` also reads chat
``"messages"``), six categories (writing, advice, coding, maths, facts, reasoning) interleaved so
that any prefix is balanced.

ALMA's human seed, written for this project (none of its prompts is in the sets above):
``alma_sft_seed.jsonl``, 40 SFT demonstrations ``{"id", "prompt", "response", "category"}`` (D1;
the paper has 5k), and ``alma_seed_ratings.jsonl``, 96 rated responses ``{"id", "prompt",
"response", "rating"}`` (48 prompts x 2 responses, integer ratings 0-10 on the paper's guideline;
the paper has 4k). ``load_demonstrations`` reads both and any user file of the same form.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from orchestrator import chat
from orchestrator.errors import ConfigError
from orchestrator.store import parse_jsonl
from orchestrator.types import Demonstration, Prompt

SEED_FILE = "seed_prompts.jsonl"
EVAL_FILE = "eval_prompts.jsonl"
DEV_FILE = "dev_prompts.jsonl"
ALMA_SFT_SEED_FILE = "alma_sft_seed.jsonl"
ALMA_SEED_RATINGS_FILE = "alma_seed_ratings.jsonl"
UPO_SEED_CONCISE_FILE = "upo_seed_concise.jsonl"
MAX_RATING = 10


def _package_file(name: str) -> Path:
    try:
        res = importlib.resources.files(__name__) / name
        path = Path(str(res))
        if path.exists():
            return path
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - odd loaders (zip imports)
        pass
    return Path(__file__).resolve().parent / name


def package_file(name: str) -> Path:
    """A data file shipped in this package, by file name; ConfigError naming the shipped ones if absent."""
    path = _package_file(name)
    if "/" in name or not path.is_file():
        shipped = sorted(p.name for p in _package_file(SEED_FILE).parent.glob("*.jsonl"))
        raise ConfigError(f"${{package_data:{name}}}: no such file in the package (shipped: {', '.join(shipped)})")
    return path


def seed_prompts_path() -> Path:
    """The seed prompt set shipped in the package."""
    return _package_file(SEED_FILE)


def eval_prompts_path() -> Path:
    """The held-out evaluation prompt set shipped in the package (never train on it)."""
    return _package_file(EVAL_FILE)


def dev_prompts_path() -> Path:
    """The development prompt set shipped in the package: ExPO's alpha is chosen on it (never
    trained or evaluated on)."""
    return _package_file(DEV_FILE)


def alma_sft_seed_path() -> Path:
    """ALMA's SFT seed shipped in the package (40 demonstrations)."""
    return _package_file(ALMA_SFT_SEED_FILE)


def alma_seed_ratings_path() -> Path:
    """ALMA's judge seed shipped in the package (96 responses rated 0-10)."""
    return _package_file(ALMA_SEED_RATINGS_FILE)


def upo_seed_concise_path() -> Path:
    """Labelled pairs shipped in the package where the better reply is the shorter one (48 pairs)."""
    return _package_file(UPO_SEED_CONCISE_FILE)


def load_demonstrations(path: str | Path, *, what: str, rated: bool = False) -> list[Demonstration]:
    """Replies to prompts from a JSONL file: each line a prompt as ``load_prompts`` reads it
    (``"prompt"`` or ``"messages"``, optional ``"id"``) plus a non-empty ``"response"`` string and,
    with ``rated``, a ``"rating"``: a whole number 0-10 (the record's ``score``). Any problem raises
    :class:`ConfigError` with one line naming ``what``, the path, the line and the problem."""
    file = Path(path).expanduser()
    prompts = load_prompts(file, what=what, source="seed")  # checks the file, the prompts and the ids
    rows = list(parse_jsonl(file.read_text(encoding="utf-8").splitlines()))
    out = []
    for prompt, (lineno, obj) in zip(prompts, rows, strict=True):
        where = f"{what}={file}: line {lineno}"
        response = obj.get("response")
        if not isinstance(response, str) or not response.strip():
            raise ConfigError(f"{where} has no non-empty \"response\" string")
        rating = None
        if rated:
            rating = obj.get("rating")
            if isinstance(rating, bool) or not isinstance(rating, (int, float)) or rating != int(rating) or not 0 <= rating <= MAX_RATING:
                raise ConfigError(f"{where} has \"rating\" {rating!r}; want a whole number from 0 to {MAX_RATING}")
            rating = float(rating)
        out.append(Demonstration(prompt_id=prompt.id, messages=prompt.messages, response=response, score=rating, source="seed"))
    return out


def load_prompts(path: str | Path | None, *, what: str = "data.prompts", source: str | None = None) -> list[Prompt]:
    """Read prompts from a JSONL file (None: the shipped seed set).

    Each non-blank line is a JSON object with either a non-empty ``"prompt"`` (or ``"text"``)
    string, one user message, or ``"messages"``: a chat prompt as a list of ``{"role", "content"}``
    (system / user / assistant) ending with a user turn. Optional ``"id"`` and ``"category"``;
    other keys are ignored. Missing ids become ``<file stem>-<line no>``. ``source`` defaults to
    "seed" for the shipped seed set and "file" otherwise. Any problem raises :class:`ConfigError`
    with one line naming ``what``, the path and the problem.
    """
    if path is None:
        file = seed_prompts_path()
        src = source or "seed"
    else:
        file = Path(path).expanduser()
        src = source or ("seed" if _same_file(file, seed_prompts_path()) else "file")

    where = f"{what}={file}"
    if not file.exists():
        raise ConfigError(f"{where}: file not found")
    if not file.is_file():
        raise ConfigError(f"{where}: not a file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read ({exc.strerror or exc})") from None

    prompts: list[Prompt] = []
    first_line: dict[str, int] = {}
    try:
        rows = list(parse_jsonl(text.splitlines()))
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    for lineno, obj in rows:
        if not isinstance(obj, dict):
            raise ConfigError(f"{where}: line {lineno} is not a JSON object (got {type(obj).__name__})")
        if "messages" in obj:
            if "prompt" in obj or "text" in obj:
                raise ConfigError(f"{where}: line {lineno} has both \"messages\" and \"prompt\"/\"text\" (give one)")
            if not isinstance(obj["messages"], list):
                raise ConfigError(f"{where}: line {lineno} has a non-list \"messages\" {obj['messages']!r:.60}")
            try:
                messages = chat.as_messages(obj["messages"])
            except ValueError as exc:
                raise ConfigError(f"{where}: line {lineno} has invalid \"messages\": {exc}") from None
        else:
            body = obj.get("prompt", obj.get("text"))
            if not isinstance(body, str) or not body.strip():
                raise ConfigError(f"{where}: line {lineno} has no non-empty \"prompt\" (or \"text\") string")
            messages = chat.user(body.strip())
        pid = obj.get("id")
        if pid is None:
            pid = f"{file.stem}-{lineno}"
        elif isinstance(pid, bool) or not isinstance(pid, (str, int)) or not str(pid).strip():
            raise ConfigError(f"{where}: line {lineno} has an invalid \"id\" {pid!r} (want a non-empty string)")
        pid = str(pid)
        if pid in first_line:
            raise ConfigError(f"{where}: duplicate id {pid!r} on lines {first_line[pid]} and {lineno}")
        first_line[pid] = lineno
        category = obj.get("category")
        if category is not None and not isinstance(category, str):
            raise ConfigError(f"{where}: line {lineno} has a non-string \"category\" {category!r}")
        prompts.append(Prompt(id=pid, messages=messages, source=src, category=category or None))

    if not prompts:
        raise ConfigError(f"{where}: no prompts (the file is empty)")
    return prompts


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


__all__ = [
    "alma_seed_ratings_path", "alma_sft_seed_path", "dev_prompts_path", "eval_prompts_path", "load_demonstrations", "load_prompts",
    "seed_prompts_path",
]
