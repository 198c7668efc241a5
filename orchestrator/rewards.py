"""Programmatic rewards as judges: a Python callable (``judge=function``), the ready verifiable
instruction-following reward (``judge=verifiable``, orchestrator/rewards_if.py) and an LLM judge
combined with a function (``judge=hybrid``).

The judge stage does not change: the judge worker's ``score`` calls ``judging.score_with``, which
hands any ``judge.kind`` other than ``llm`` to ``score_with`` here. The result is the same
``Judgment`` records on the same ``judge.min_score..judge.max_score`` scale, so pairs, filters and
metrics read them as they read the LLM judge's; each record also keeps its raw components
(``Judgment.components``: ``{"function": v}`` or ``{"llm": s, "function": v}``).

The callable, named ``"pkg.module:fn"`` in ``judge.function`` (importable where the judge runs: an
installed package or a module on ``PYTHONPATH``)::

    # judge.function_batched=false (default): one call per response
    def fn(messages: list[dict[str, str]], response: str, **judge.function_kwargs) -> float | None

    # judge.function_batched=true: one call for the stage (a model-based or remote reward)
    def fn(messages: list[list[dict[str, str]]], responses: list[str], **judge.function_kwargs) -> list[float | None]

``messages`` is the prompt as chat messages (``[{"role": "user", "content": ...}]``), ``response``
the sampled answer as written (not the judge's redacted view: a checker must see what it checks).
A value must be a finite number in ``judge.function_range`` (bools count as 0/1); ``None`` means
"no opinion" (e.g. a prompt with nothing to check): the response is unscored, as an unparsed LLM
judgment is. Anything else stops the stage with one line naming the function, the record and the
value. A function's value ``v`` becomes the score ``min + (v - lo) / (hi - lo) * (max - min)``.

Hybrid: both components are put on [0, 1] (the LLM's over ``min_score..max_score``, the
function's over its range), combined as the weighted mean with ``judge.hybrid.weights`` (any
positive numbers; they are normalised to sum 1), and mapped back to the judge's scale. A missing
component (``None``) is left out of the mean with ``judge.hybrid.missing=skip`` (the verifiable
reward has nothing to say on a prompt without constraints), or leaves the response unscored with
``missing=none``.
"""

from __future__ import annotations

import importlib
import inspect
import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from orchestrator import judging
from orchestrator.errors import ConfigError, JudgeError
from orchestrator.section import Section
from orchestrator.types import Generation, Judgment

KINDS = ("llm", "function", "hybrid")
COMPONENTS = ("llm", "function")
MISSING = ("skip", "none")


def kind_of(cfg: Mapping[str, Any]) -> str:
    """The judge section's kind; sections from before reward functions have none and are LLM judges."""
    return str(cfg.get("kind") or "llm")


def load_function(path: Any, key: str = "judge.function") -> Callable[..., Any]:
    """The callable named ``"pkg.module:fn"`` (``fn`` may be dotted: ``Class.method``); ConfigError otherwise."""
    if not isinstance(path, str) or path.count(":") != 1 or not all(path.split(":")):
        raise ConfigError(f"{key}={path!r} is invalid: want an import path \"pkg.module:function\"")
    module_name, attr = path.split(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        # The module's own failing import names the real cause (a missing dependency inside it).
        raise ConfigError(f"{key}={path!r}: cannot import {module_name!r} ({exc})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key}={path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{key}={path!r} is a {type(obj).__name__}, not a callable")
    return obj


def _check_signature(fn: Callable[..., Any], path: str, kwargs: Mapping[str, Any]) -> None:
    """Refuse a callable that cannot take (messages, response, **kwargs): at config time, not mid-round."""
    try:
        inspect.signature(fn).bind("messages", "response", **kwargs)
    except TypeError as exc:
        raise ConfigError(
            f"judge.function={path!r} cannot be called as fn(messages, response, **judge.function_kwargs) ({exc})"
        ) from None
    except ValueError:  # builtins without a signature: the first call tells
        pass


def _range(cfg: Mapping[str, Any]) -> tuple[float, float]:
    value = cfg.get("function_range")
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"judge.function_range={value!r} is invalid: want [lo, hi]") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ConfigError(f"judge.function_range={value!r} is invalid: want finite lo < hi")
    return lo, hi


def hybrid_weights(cfg: Mapping[str, Any]) -> dict[str, float]:
    """``judge.hybrid.weights`` normalised to sum 1; ConfigError for unknown names or bad values."""
    hybrid = cfg.get("hybrid") or {}
    weights = hybrid.get("weights") or {}
    unknown = set(weights) - set(COMPONENTS)
    if unknown or not weights:
        raise ConfigError(f"judge.hybrid.weights={dict(weights)!r} is invalid: want weights for {' and '.join(COMPONENTS)}")
    out = {}
    for name in COMPONENTS:
        try:
            w = float(weights.get(name, 0))
        except (TypeError, ValueError):
            w = -1.0
        if not (math.isfinite(w) and w >= 0) or isinstance(weights.get(name), bool):
            raise ConfigError(f"judge.hybrid.weights.{name}={weights.get(name)!r} is invalid: want a number >= 0")
        out[name] = w
    total = sum(out.values())
    if total <= 0:
        raise ConfigError(f"judge.hybrid.weights={dict(weights)!r} is invalid: at least one weight must be > 0")
    return {k: v / total for k, v in out.items()}


@dataclass(frozen=True)
class RewardFunction:
    """A judge section's callable with its settings, checked once (``from_config``)."""

    fn: Callable[..., Any]
    path: str
    kwargs: Mapping[str, Any]
    batched: bool
    lo: float
    hi: float

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "RewardFunction":
        path = cfg.get("function")
        fn = load_function(path)
        kwargs = dict(cfg.get("function_kwargs") or {})
        batched = cfg.get("function_batched", False)
        if not isinstance(batched, bool):
            raise ConfigError(f"judge.function_batched={batched!r} is invalid: want true or false")
        _check_signature(fn, path, kwargs)
        lo, hi = _range(cfg)
        return cls(fn, path, kwargs, batched, lo, hi)

    def _value(self, value: Any, gen: Generation) -> float | None:
        if value is None:
            return None
        ok = isinstance(value, (int, float)) and math.isfinite(float(value)) and self.lo <= float(value) <= self.hi
        if not ok:
            raise JudgeError(
                f"judge.function={self.path!r} returned {value!r} ({type(value).__name__}) for response {gen.key}; "
                f"want a number in judge.function_range [{self.lo:g}, {self.hi:g}] or None"
            )
        return float(value)

    def __call__(self, generations: Sequence[Generation]) -> list[float | None]:
        """One value (or None) per generation, each checked."""
        messages = [[dict(m) for m in g.messages] for g in generations]
        if self.batched:
            values = self.fn(messages, [g.text for g in generations], **self.kwargs)
            if not isinstance(values, (list, tuple)) or len(values) != len(generations):
                got = f"{len(values)} values" if isinstance(values, (list, tuple)) else repr(type(values).__name__)
                raise JudgeError(
                    f"judge.function={self.path!r} (batched) returned {got} for {len(generations)} responses; "
                    f"want a list with one number or None per response"
                )
        else:
            values = [self.fn(m, g.text, **self.kwargs) for m, g in zip(messages, generations)]
        return [self._value(v, g) for v, g in zip(values, generations)]

    def to_unit(self, value: float) -> float:
        return (value - self.lo) / (self.hi - self.lo)


def validate(cfg: Mapping[str, Any]) -> None:
    """Check a judge section's reward settings: ConfigError with one line, before any worker starts.
    Imports the function (so a typo in its path fails here), never calls it."""
    kind = kind_of(cfg)
    if kind not in KINDS:
        raise ConfigError(f"judge.kind={kind!r} is invalid: one of {', '.join(KINDS)}")
    if kind == "llm":
        return
    RewardFunction.from_config(cfg)
    if kind == "hybrid":
        hybrid_weights(cfg)
        missing = (cfg.get("hybrid") or {}).get("missing")
        if missing not in MISSING:
            raise ConfigError(f"judge.hybrid.missing={missing!r} is invalid: one of {', '.join(MISSING)}")


def _scale(cfg: Mapping[str, Any]) -> tuple[float, float]:
    return float(cfg["min_score"]), float(cfg["max_score"])


def function_judgments(generations: Sequence[Generation], cfg: Mapping[str, Any]) -> list[Judgment]:
    """Judgments from the function alone, on the judge's scale."""
    reward = RewardFunction.from_config(cfg)
    lo, hi = _scale(cfg)
    out = []
    for gen, value in zip(generations, reward(generations), strict=True):
        score = None if value is None else lo + reward.to_unit(value) * (hi - lo)
        out.append(Judgment(prompt_id=gen.prompt_id, index=gen.index, score=score, samples=[score],
                            raw=[f"{reward.path} -> {value!r}"], mode="function", components={"function": value}))
    return out


def combine(llm: float | None, function: float | None, weights: Mapping[str, float], missing: str) -> float | None:
    """The weighted mean of the components on [0, 1]; a missing one left out (``skip``) or fatal (``none``)."""
    parts = {"llm": llm, "function": function}
    present = {k: v for k, v in parts.items() if v is not None and weights[k] > 0}
    if not present or (missing == "none" and len(present) < sum(1 for w in weights.values() if w > 0)):
        return None
    total = sum(weights[k] for k in present)
    return sum(weights[k] * v for k, v in present.items()) / total


def hybrid_judgments(
    backend: Any, generations: Sequence[Generation], cfg: Mapping[str, Any], fits: judging.Fits | None
) -> list[Judgment]:
    """The LLM judge's judgments (``judge.mode`` as usual) combined with the function's values."""
    reward = RewardFunction.from_config(cfg)
    weights = hybrid_weights(cfg)
    missing = cfg["hybrid"]["missing"]
    lo, hi = _scale(cfg)
    llm = judging.score_with(backend, list(generations), {**cfg, "kind": "llm"}, fits) if weights["llm"] > 0 else [None] * len(generations)
    values = reward(generations)
    out = []
    for gen, j, value in zip(generations, llm, values, strict=True):
        llm_score = j.score if j is not None else None
        unit = combine(
            None if llm_score is None else (llm_score - lo) / (hi - lo),
            None if value is None else reward.to_unit(value),
            weights, missing,
        )
        score = None if unit is None else lo + unit * (hi - lo)
        out.append(Judgment(
            prompt_id=gen.prompt_id, index=gen.index, score=score,
            samples=j.samples if j is not None else [], raw=(j.raw if j is not None else []) + [f"{reward.path} -> {value!r}"],
            mode=f"hybrid:{j.mode}" if j is not None else "hybrid", mass=j.mass if j is not None else None,
            components={"llm": llm_score, "function": value},
        ))
    return out


def score_with(backend: Any, generations: list[Generation], cfg: Mapping[str, Any], fits: judging.Fits | None = None) -> list[Judgment]:
    """Judge ``generations`` as ``judge.kind`` says (``function`` or ``hybrid``; ``llm`` is judging's own)."""
    cfg = Section("judge", cfg)
    kind = kind_of(cfg)
    if kind == "function":
        return function_judgments(generations, cfg)
    if kind == "hybrid":
        return hybrid_judgments(backend, generations, cfg, fits)
    raise ConfigError(f"judge.kind={kind!r} is invalid: one of {', '.join(KINDS)}")


def component_metrics(judgments: Sequence[Judgment]) -> dict[str, float]:
    """Per component: how many records it scored and its mean and std (raw scale); with both, their
    Pearson correlation (how far the LLM judge agrees with the function)."""
    metrics: dict[str, float] = {}
    names = sorted({k for j in judgments for k in (j.components or {})})
    for name in names:
        vals = [j.components[name] for j in judgments if j.components and j.components.get(name) is not None]
        metrics[f"judge/{name}/scored"] = float(len(vals))
        if vals:
            metrics[f"judge/{name}/mean"] = statistics.fmean(vals)
            metrics[f"judge/{name}/std"] = statistics.pstdev(vals)
    both = [(j.components["llm"], j.components["function"]) for j in judgments
            if j.components and j.components.get("llm") is not None and j.components.get("function") is not None]
    if len(both) >= 3:
        xs, ys = zip(*both)
        if statistics.pstdev(xs) > 0 and statistics.pstdev(ys) > 0:
            metrics["judge/hybrid/llm_function_corr"] = statistics.correlation(xs, ys)
    return metrics
