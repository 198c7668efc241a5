"""A judge (or sampler) behind an OpenAI-compatible HTTP endpoint, e.g. ``vllm serve``.

Same coarse methods as ``VLLMWorker`` (``generate``, ``choice_probs``, ``score``), so the
controller and the eval stage use either without knowing which. Plain HTTP through ``requests``;
runs in the driver process, since it holds no model.

A server under load answers 429 or 503, times out, or returns half a body now and then; one such
answer must not cost a round. Each request is retried (``max_retries``, exponential backoff from
``backoff_s`` up to ``max_backoff_s`` with jitter, or the server's ``Retry-After``), and a request
that still fails is a counted failure of that one item: no judgment for that response (never a
silent 0), which the stage's ``judge.max_parse_failure_rate`` then weighs with the rest. Answers
that no retry can fix stop the stage at once: a refused key or a wrong URL (401, 403, 404, 405,
407), or every request of a call failing.
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit, urlunsplit

import requests

from orchestrator import judging
from orchestrator.chat import Messages, as_messages, defuse_messages, defuse_special_text
from orchestrator.errors import OrchestratorError
from orchestrator.redact import redact_text
from orchestrator.section import Section
from orchestrator.types import Completion, Generation, GenerationRequest, Judgment

log = logging.getLogger(__name__)
T = TypeVar("T")

# Answers worth another try: the server is busy, restarting or timed out on its side.
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
# Answers no retry can fix and that every item would get alike: the stage stops with the reason.
FATAL_STATUS = frozenset({401, 403, 404, 405, 407})
# Anything else (400 for a prompt over the context length, 413, 422) fails that item only.


class RequestFailed(Exception):
    """One request failed for good (retries spent, or an answer that no retry fixes)."""


def retry_after_s(value: str | None, now: datetime | None = None) -> float | None:
    """A ``Retry-After`` header in seconds: delta-seconds or an HTTP date; None when absent or
    unreadable (the usual backoff then applies)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT by definition
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


def backoff_s(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """The wait before retry ``attempt`` (0-based): ``base * 2**attempt`` capped at ``cap``, times a
    random factor in [0.5, 1) so that many requests failing together do not retry together."""
    return min(cap, base * (2.0**attempt)) * (0.5 + 0.5 * rng.random())


def join_url(base_url: str, path: str) -> str:
    """``path`` appended to the base URL's path, its query (``?api_key=...``) kept at the end."""
    parts = urlsplit(base_url)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + path))


class EndpointWorker:
    def __init__(
        self,
        endpoint: dict[str, Any],
        section: str = "judge.endpoint",
        *,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ):
        cfg = Section(section, endpoint)
        self.section = section
        self.base_url = str(cfg["base_url"]).rstrip("/")
        # What messages show: the base URL without its credentials.
        self.shown_url = redact_text(self.base_url)
        self.timeout = float(cfg["timeout_s"])
        self.max_retries = int(cfg["max_retries"])
        self.backoff = float(cfg["backoff_s"])
        self.max_backoff = float(cfg["max_backoff_s"])
        self.concurrency = int(cfg["concurrency"])  # the values are checked by orchestrator.config.validate
        self.key_env = str(cfg["api_key_env"] or "")
        key = os.environ.get(self.key_env, "") if self.key_env else ""
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._fatal: str | None = None  # set by the first fatal answer: other threads stop too
        self.stats = {"requests": 0, "retries": 0, "failed": 0}
        self.model = cfg["model"] or self._first_model()

    # -- one request, retried ------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict[str, Any] | None, parse: Callable[[Any], T]) -> T:
        """``parse(answer JSON)`` of one request, retried on busy answers, timeouts, refused
        connections and answers ``parse`` cannot read. Raises ``RequestFailed`` when it fails for
        good, ``OrchestratorError`` when no request can succeed (bad key, wrong URL)."""
        url = join_url(self.base_url, path)
        reason = ""
        for attempt in range(self.max_retries + 1):
            if self._fatal:
                raise OrchestratorError(self._fatal)
            wait: float | None = None
            with self._lock:
                self.stats["requests"] += 1
            try:
                resp = requests.request(method, url, json=body, headers=self.headers, timeout=self.timeout)
            except requests.Timeout:
                reason = f"no answer within {self.timeout:g} s (judge endpoint timeout_s)"
            except requests.RequestException as exc:
                reason = f"unreachable ({exc.__class__.__name__})"
            else:
                status = resp.status_code
                if status == 200:
                    try:
                        return parse(resp.json())
                    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
                        reason = f"answered a body it could not read ({exc.__class__.__name__}: {_snippet(resp)})"
                elif status in FATAL_STATUS:
                    with self._lock:
                        self._fatal = self._fatal or (
                            f"{self.section} {self.shown_url}{path} answered HTTP {status}: {_snippet(resp)} "
                            f"(check {self.section}.base_url, {self.section}.model and the key in "
                            f"${self.key_env or '<api_key_env unset>'})"
                        )
                    raise OrchestratorError(self._fatal)
                elif status in RETRY_STATUS or (status >= 500 and status not in (501, 505)):
                    reason = f"HTTP {status}"
                    wait = retry_after_s(resp.headers.get("Retry-After"))
                else:
                    raise RequestFailed(f"HTTP {status}: {_snippet(resp)}")
            if attempt == self.max_retries:
                break
            if wait is not None and wait > self.max_backoff:
                # The server asks for longer than a retry may wait: retrying sooner only earns
                # another refusal, so the item fails now.
                reason += f" with Retry-After {wait:g} s > {self.section}.max_backoff_s={self.max_backoff:g}"
                break
            with self._lock:
                self.stats["retries"] += 1
            self._sleep(wait if wait is not None else backoff_s(attempt, self.backoff, self.max_backoff, self._rng))
        raise RequestFailed(f"{reason} after {attempt + 1} attempt(s)")

    def _first_model(self) -> str:
        try:
            return self._request("GET", "/models", None, lambda data: str(data["data"][0]["id"]))
        except RequestFailed as exc:
            raise OrchestratorError(
                f"{self.section}.model is not set and {self.shown_url}/models did not name one ({exc})"
            ) from None

    def _map(self, fn: Callable[[Any], T], items: list[Any], failed: Callable[[], T]) -> list[T]:
        """``fn`` over ``items`` in parallel; an item whose request fails for good gets ``failed()``.
        Raises when every item failed: nothing would be kept, and the cause is the endpoint."""
        errors: list[str] = []

        def guarded(item: Any) -> T:
            try:
                return fn(item)
            except RequestFailed as exc:
                with self._lock:
                    self.stats["failed"] += 1
                    errors.append(str(exc))
                return failed()

        with ThreadPoolExecutor(self.concurrency) as pool:
            out = list(pool.map(guarded, items))
        if errors:
            if len(errors) == len(items):
                raise OrchestratorError(
                    f"{self.section} {self.shown_url}: all {len(items)} requests failed after "
                    f"{self.section}.max_retries={self.max_retries} retries; e.g. {errors[0]}"
                )
            log.warning(
                "%s %s: %d of %d requests failed after %d retries (e.g. %s); those items get no judgment",
                self.section, self.shown_url, len(errors), len(items), self.max_retries, errors[0],
            )
        return out

    def _messages(self, prompt: Messages | str, assistant_prefix: str = "") -> tuple[Messages, dict[str, Any]]:
        # The server renders its own chat template from text: special-token strings a model wrote
        # must not become its control tokens (a forged turn), so they are defused here.
        messages = defuse_messages(as_messages(prompt))
        if not assistant_prefix:
            return messages, {}
        # vLLM's server continues a final assistant message, which makes the prefix a real prefill.
        messages.append({"role": "assistant", "content": assistant_prefix})
        return messages, {"continue_final_message": True, "add_generation_prompt": False}

    def _post(self, path: str, body: dict[str, Any], parse: Callable[[Any], T] = lambda data: data) -> T:
        return self._request("POST", path, body, parse)

    # -- the worker API ------------------------------------------------------------------------
    def generate(self, request: GenerationRequest) -> list[Completion]:
        """One completion per prompt; a prompt whose request fails for good gets ``n`` empty texts
        with finish reason ``error`` (a judge then parses no score from them)."""

        def read(data: Any) -> Completion:
            choices = sorted(data["choices"], key=lambda c: c["index"])
            texts = [c["message"]["content"] if request.chat else c["text"] for c in choices]
            usage = data.get("usage") or {}
            per = int(usage.get("completion_tokens", 0)) // max(len(choices), 1)
            return Completion(texts=texts, num_tokens=[per] * len(texts), finish_reasons=[str(c.get("finish_reason")) for c in choices])

        def one(prompt: Messages | str) -> Completion:
            if request.chat:
                body: dict[str, Any] = {"messages": self._messages(prompt)[0]}
                path = "/chat/completions"
            else:
                body = {"prompt": defuse_special_text(prompt)}
                path = "/completions"
            body.update(
                model=self.model, n=request.n, temperature=request.temperature, top_p=request.top_p,
                max_tokens=request.max_tokens, stop=list(request.stop) or None,
            )
            return self._post(path, body, read)

        def failed() -> Completion:
            return Completion(texts=[""] * request.n, num_tokens=[0] * request.n, finish_reasons=["error"] * request.n)

        return self._map(one, list(request.prompts), failed)

    def choice_probs(
        self, prompts: list[Messages] | list[str], choices: list[str], assistant_prefix: str = "", chat: bool = True
    ) -> list[dict[str, float] | None]:
        """As ``VLLMWorker.choice_probs`` (not renormalised: the sum is the judge's mass on the
        choices), from the server's top-20 log-probabilities, so a lower bound of it; None for a
        prompt where no choice is among them, or whose request fails for good. A token that is a
        space and then the choice counts (" 5"); a space written as a token of its own does not."""

        def read(data: Any) -> dict[str, float] | None:
            content = (data["choices"][0].get("logprobs") or {}).get("content") or []
            if not content:
                return None
            mass = {c: 0.0 for c in choices}
            for entry in content[0].get("top_logprobs", []):
                token = entry["token"].strip()
                if token in mass:
                    mass[token] += math.exp(entry["logprob"])
            return mass if sum(mass.values()) > 0 else None

        def one(prompt: Messages | str) -> dict[str, float] | None:
            messages, extra = self._messages(prompt, assistant_prefix)
            body = {"model": self.model, "messages": messages, "max_tokens": 1, "temperature": 1.0,
                    "logprobs": True, "top_logprobs": 20, **extra}
            return self._post("/chat/completions", body, read)

        return self._map(one, list(prompts), lambda: None)

    def score(self, generations: list[Generation], judge_cfg: dict[str, Any]) -> list[Judgment]:
        return judging.score_with(self, generations, judge_cfg)

    def sync_weights(self, model_path: str) -> float:
        raise OrchestratorError("an endpoint judge serves a fixed model; it cannot load new weights")

    def shutdown(self) -> None:
        pass


def _snippet(resp: requests.Response) -> str:
    """The start of an answer's body, on one line, credentials masked (a body may echo the URL)."""
    return redact_text(" ".join(resp.text[:200].split())) or "(empty body)"
