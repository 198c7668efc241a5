"""Secrets out of everything the project writes or prints.

One place decides what a secret is; every writer of config or logs goes through it: MLflow params
and the ``config.yaml`` artifact (``tracking.py``), ``manifest.json`` and ``config.yaml`` in the
run dir (``store.py``, ``controller.py``), printed lines and errors (``cli.py``, ``eval/cli.py``),
log records, the Hydra log included (``install_log_redaction``), and a submitted job's
entrypoint, metadata and config copy (``submit.py``). The code that uses a secret keeps the real
value: only what is written or shown is redacted.

A secret is
- the ``user:password`` part of any URL: ``http://alice:pw@host`` -> ``http://***@host``;
- the value of a URL query parameter named like a credential (``?token=``, ``api_key=``,
  ``X-Amz-Signature=``, ...), and a ``Bearer`` token in text;
- every value under an ``env_vars`` mapping (``cluster.runtime_env.env_vars``): a job's
  environment is where its secrets travel, and a value cannot tell whether it is one;
- the value of a config key named like a credential (``password``, ``secret``, ``token``,
  ``api_key``, ...; not ``api_key_env``, which names a variable, nor ``max_tokens``).

Redaction is idempotent (``***`` redacts to itself), so resume can compare the redacted config
it stored with the redacted form of the new one: a rotated password is not a config change, a
different host still is.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from typing import Any, Iterable, TextIO

MASK = "***"

# Words of a query parameter or environment variable name that make its value a credential.
_SECRET_WORDS = frozenset(
    "token key apikey secret password passwd pwd pass sig signature credential credentials auth jwt sas".split()
)
# Config keys are matched more strictly (their last word, or last two), since config keys such as
# ``max_tokens`` or ``api_key_env`` hold no secret.
_SECRET_LAST_WORDS = frozenset("password passwd pwd secret token apikey credential credentials".split())
_SECRET_LAST_PAIRS = frozenset({("api", "key"), ("secret", "key"), ("access", "key"), ("private", "key"), ("auth", "key")})

# scheme://netloc: the netloc runs to the first / ? # or whitespace; credentials end at its last @
# (an unencoded @ in a password still leaves nothing of it behind).
_URL_NETLOC = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<netloc>[^\s/?#'\"<>]*)")
_QUERY_PARAM = re.compile(r"(?P<lead>[?&;])(?P<name>[A-Za-z0-9_.\-]+)=(?P<value>[^&\s#'\"<>]*)")
_BEARER = re.compile(r"(?i)\b(bearer\s+)(?!\*\*\*)[A-Za-z0-9._~+/=\-]+")

# Literal secret values found in the config, replaced wherever they appear in text (an exception
# message that quotes a URL in pieces, a library's log line). Short values are left out: "1" or
# "true" replaced in every log line would make logs unreadable and protect nothing.
_MIN_LITERAL = 4
_known: set[str] = set()
_known_lock = threading.Lock()


def _words(name: str) -> list[str]:
    return [w for w in re.split(r"[_\-.\s]+", name.lower()) if w]


def secret_name(name: str) -> bool:
    """A query parameter or environment variable name whose value is a credential."""
    return any(w in _SECRET_WORDS for w in _words(name))


def secret_key(key: str) -> bool:
    """A config key whose value is a credential (``password``, ``db_password``, ``api_key``, ...)."""
    words = _words(str(key))
    if not words:
        return False
    return words[-1] in _SECRET_LAST_WORDS or tuple(words[-2:]) in _SECRET_LAST_PAIRS


def _netloc(match: re.Match) -> str:
    netloc = match.group("netloc")
    if "@" not in netloc:
        return match.group(0)
    return f"{match.group('scheme')}{MASK}@{netloc.rsplit('@', 1)[1]}"


def _query(match: re.Match) -> str:
    value = match.group("value")
    # Masked already: left as it is, with whatever followed the mask (``?key=***: ...``).
    if not secret_name(match.group("name")) or not value or value.startswith(MASK):
        return match.group(0)
    return f"{match.group('lead')}{match.group('name')}={MASK}"


def redact_text(text: str) -> str:
    """``text`` with URL credentials, credential query values, bearer tokens and every secret value
    seen in a config (``remember``) replaced by ``***``."""
    if not text:
        return text
    text = _URL_NETLOC.sub(_netloc, str(text))
    text = _QUERY_PARAM.sub(_query, text)
    text = _BEARER.sub(lambda m: m.group(1) + MASK, text)
    with _known_lock:
        known = sorted(_known, key=len, reverse=True)  # longest first: a secret inside another
    for value in known:
        if value in text:
            text = text.replace(value, MASK)
    return text


def redact_url(url: str) -> str:
    """A URL (or any string) with its credentials masked; the same as ``redact_text``."""
    return redact_text(url)


def _under_env_vars(path: tuple[str, ...]) -> bool:
    return "env_vars" in path


def redact_value(path: tuple[str, ...], value: Any) -> Any:
    """``value`` found at config ``path`` (its keys from the root), redacted."""
    if isinstance(value, dict):
        return {k: redact_value((*path, str(k)), v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(path, v) for v in value]
    if value is None or value == "":
        return value
    if _under_env_vars(path) or (path and secret_key(path[-1])):
        return MASK
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact_config(config: Any) -> Any:
    """A copy of a plain config (dicts, lists, scalars) with every secret replaced by ``***``."""
    return redact_value((), config)


def redact_override(override: str) -> str:
    """A Hydra command-line override (``key=value``) with a secret value masked."""
    if override.startswith("-") or "=" not in override:
        return redact_text(override)
    key, value = override.split("=", 1)
    path = tuple(p for p in re.sub(r"^(~|\+\+|\+)", "", key).split("@", 1)[0].split(".") if p)
    if _under_env_vars(path) or (path and secret_key(path[-1])):
        return f"{key}={MASK}" if value else override
    return f"{key}={redact_text(value)}"


# -- secret values, for text ---------------------------------------------------------------


def _url_secrets(text: str) -> Iterable[str]:
    for match in _URL_NETLOC.finditer(text):
        netloc = match.group("netloc")
        if "@" in netloc:
            userinfo = netloc.rsplit("@", 1)[0]
            yield userinfo
            if ":" in userinfo:
                yield userinfo.split(":", 1)[1]
    for match in _QUERY_PARAM.finditer(text):
        if secret_name(match.group("name")):
            yield match.group("value")


def secrets_in(config: Any, path: tuple[str, ...] = ()) -> set[str]:
    """The secret values of a plain config: what ``redact_config`` masks, as literal strings."""
    found: set[str] = set()
    if isinstance(config, dict):
        for k, v in config.items():
            found |= secrets_in(v, (*path, str(k)))
    elif isinstance(config, (list, tuple)):
        for v in config:
            found |= secrets_in(v, path)
    elif config is not None and config != "":
        text = str(config)
        if (path and secret_key(path[-1])) or (len(path) >= 2 and path[-2] == "env_vars" and secret_name(path[-1])):
            found.add(text)
        found.update(_url_secrets(text))
    return {s for s in found if len(s) >= _MIN_LITERAL and s != MASK}


def remember(config: Any) -> None:
    """Add a plain config's secret values to those ``redact_text`` replaces in any text."""
    values = secrets_in(config)
    with _known_lock:
        _known.update(values)


def forget_all() -> None:
    """Drop every remembered value (tests)."""
    with _known_lock:
        _known.clear()


# -- logging ---------------------------------------------------------------------------------


class RedactingFilter(logging.Filter):
    """Redacts a record's message and traceback before a handler writes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let the handler report it as it would
            return True
        record.msg, record.args = redact_text(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return True


LOG_FILTER = RedactingFilter()


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Put the redacting filter on every handler of ``logger`` (default: the root logger, where
    Hydra puts its console and file handlers). A handler filter sees records from every logger
    that propagates to it; a logger filter would see only that logger's own records."""
    logger = logger or logging.getLogger()
    for handler in logger.handlers:
        if LOG_FILTER not in handler.filters:
            handler.addFilter(LOG_FILTER)


class RedactingStream:
    """A text stream that redacts whole lines before they reach ``stream``: libraries print to
    sys.stdout themselves (MLflow prints each run's URL, tracking credentials included). A partial
    line waits for its end, or for ``flush`` (progress bars write ``\r`` and flush)."""

    def __init__(self, stream: TextIO):
        self._stream = stream
        self._pending = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            self._pending += text
            cut = max(self._pending.rfind("\n"), self._pending.rfind("\r"))
            if cut >= 0:
                done, self._pending = self._pending[: cut + 1], self._pending[cut + 1 :]
                self._stream.write(redact_text(done))
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                self._stream.write(redact_text(self._pending))
                self._pending = ""
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # encoding, isatty, fileno, ...: the real stream's
        return getattr(self._stream, name)


def redact_std_streams() -> None:
    """Route sys.stdout and sys.stderr through ``RedactingStream`` (once)."""
    if not isinstance(sys.stdout, RedactingStream):
        sys.stdout = RedactingStream(sys.stdout)
    if not isinstance(sys.stderr, RedactingStream):
        sys.stderr = RedactingStream(sys.stderr)


def guard(config: Any, streams: bool = False) -> None:
    """Before a command writes or logs anything: remember ``config``'s secrets and redact log
    handlers; with ``streams``, sys.stdout and sys.stderr too (the command-line entry points)."""
    remember(config)
    install_log_redaction()
    if streams:
        redact_std_streams()

