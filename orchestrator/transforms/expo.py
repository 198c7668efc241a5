"""ExPO as a checkpoint transform (``transforms=[expo]``; knobs in conf/transforms/expo.yaml).

After a round's training, with theta_1 the round's trained ``policy`` checkpoint::

    theta_0     <- the policy that started the round (anchor=prev) or the run's starting model (anchor=start)
    for alpha in {0} + transform.expo.alphas:                       (alpha = 0 is theta_1 itself)
        theta_alpha <- theta_1 + alpha * (theta_1 - theta_0)        every tensor (orchestrator/expo.py)
        score(alpha) <- the scorer's mean score of theta_alpha's answers to the dev prompts
    alpha*      <- argmax score (ties: the smaller alpha), or the fixed transform.expo.alpha
    the round's "expo" checkpoint <- theta_{alpha*}; promoted to the next round's policy if promote

The paper (Zheng et al. 2024; algorithms.md 4) extrapolates once, from the SFT model to the aligned
one, and picks alpha by a reward model's mean score on a development set. Per round is our
extension: ``anchor=prev`` extrapolates each round's DPO update, ``anchor=start`` the whole change
since the starting model (with ``promote=false`` the last round's ``expo`` checkpoint is then the
paper's one-shot ExPO of the final model). The scorer is a judge instead of a reward model: the
fixed eval judge (``eval_judge``: the starting model by default, never the candidate itself) or
the round's judge (``judge``), each with the run's ``judge.*`` prompt and mode.

Stages in the round's directory: ``expo_search.jsonl`` (one ``Candidate`` per alpha; while the
search runs, finished candidates are in ``expo_search.partial.jsonl``, so a killed search resumes
at the first unscored alpha), ``checkpoints/expo`` (built once: the best candidate's folder is
moved into place), ``expo_alpha_search.png``, and the transform's metrics ``transform_expo``.
Candidates are built in ``expo_candidates/`` and deleted once scored, except the best so far.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from orchestrator import stages
from orchestrator.config import check, number, to_plain
from orchestrator.controller import POLICY
from orchestrator.data import dev_prompts_path, load_prompts
from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.expo import extrapolate
from orchestrator.roles import call
from orchestrator.store import read_jsonl, write_jsonl
from orchestrator.types import Generation, Judgment, Prompt, Record

if TYPE_CHECKING:
    from orchestrator.plugins import StageContext
    from orchestrator.roles import Role

log = logging.getLogger(__name__)

ANCHORS = ("start", "prev")
SCORERS = ("eval_judge", "judge")
KEYS = ("anchor", "alphas", "alpha", "scorer", "dev_prompts", "dev_max_prompts", "decoding", "promote")
DECODING_KEYS = ("n", "temperature", "top_p", "max_tokens")

SEARCH = "expo_search"  # the stage of candidate records
CHECKPOINT = "expo"  # the round's named checkpoint (and the stage of its build metrics)
CANDIDATES = "expo_candidates"  # the folder candidates are built in
PNG = "expo_alpha_search.png"


@dataclass
class Candidate(Record):
    """One alpha of the search and its dev score."""

    alpha: float
    score: float | None  # mean score over the scored dev responses (the judge's scale)
    scores: list[float | None]  # per dev response, in dev-prompt order
    response_chars_mean: float = 0.0
    truncated_rate: float = 0.0
    # orchestrator.expo.extrapolate's metrics for this candidate (empty for alpha = 0: theta_1 itself)
    extrapolation: dict[str, float] = field(default_factory=dict)


# -- the search, shared by the transform and orchestrate-expo ------------------------------------
def grid(alphas: Iterable[float]) -> list[float]:
    """The candidates: alpha = 0 (the trained model, the baseline) and each alpha, ascending, once."""
    return sorted({0.0, *(float(a) for a in alphas)})


def best(records: Iterable[Candidate]) -> Candidate:
    """The candidate with the highest dev score; a tie goes to the smaller alpha (no extrapolation
    without evidence that it helps)."""
    scored = [r for r in records if r.score is not None]
    if not scored:
        raise OrchestratorError("ExPO: no candidate alpha got a dev score")
    return max(scored, key=lambda r: (r.score, -r.alpha))


def candidate_dir(work: Path, alpha: float) -> Path:
    return Path(work) / f"alpha_{alpha:g}"


Evaluate = Callable[[float, str], Candidate]  # (alpha, checkpoint dir) -> its record, extrapolation left empty


def search(
    weak: str | Path,
    strong: str | Path,
    alphas: Iterable[float],
    work: Path,
    evaluate: Evaluate,
    done: Sequence[Candidate] = (),
    save: Callable[[list[Candidate]], None] | None = None,
) -> tuple[list[Candidate], Path | None]:
    """Score every alpha of ``grid(alphas)`` not in ``done``; returns all records (ascending alpha)
    and the folder of the best candidate (None when alpha = 0 is best: that is ``strong`` itself).

    Each candidate is extrapolated into ``work`` (alpha = 0 is ``strong``), scored by
    ``evaluate(alpha, path)``, handed to ``save`` with the records so far, and then deleted unless it
    is the best so far. A rerun with the saved records as ``done`` recomputes nothing they hold; it
    first deletes whatever in ``work`` is not the best recorded candidate (a half-built candidate).
    """
    wanted = grid(alphas)
    records = {r.alpha: r for r in done if r.alpha in wanted}
    keep = best(records.values()).alpha if any(r.score is not None for r in records.values()) else None
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    for item in work.iterdir():
        if keep is None or item != candidate_dir(work, keep):
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    for alpha in wanted:
        if alpha in records:
            log.info("ExPO: alpha=%g already scored (%s), reusing it", alpha, records[alpha].score)
            continue
        if alpha == 0:
            path, built = Path(strong), {}
        else:
            path = candidate_dir(work, alpha)
            built = extrapolate(weak, strong, alpha, path)
        record = evaluate(alpha, str(path))
        record.extrapolation = built
        records[alpha] = record
        if save is not None:
            save([records[a] for a in wanted if a in records])
        log.info("ExPO: alpha=%g dev score %s", alpha, "none" if record.score is None else f"{record.score:.4f}")
        now = best(records.values()).alpha
        for old in {keep, alpha} - {now, None, 0.0}:
            shutil.rmtree(candidate_dir(work, old), ignore_errors=True)
        keep = now
    ordered = [records[a] for a in wanted]
    return ordered, (candidate_dir(work, keep) if keep else None)


def score_candidate(
    alpha: float, engine: Any, scorer: Callable[[], Any], prompts: Sequence[Prompt], decoding: dict[str, Any], judge_cfg: dict[str, Any]
) -> Candidate:
    """``engine`` (already serving the candidate) answers ``prompts``; ``scorer()`` judges the
    answers with ``judge_cfg`` (the ``judge`` section: prompt, mode, parse-failure limit)."""
    gens, _ = stages.generate_responses(call, engine, prompts, decoding)
    judgments, _ = stages.judge_responses(call, scorer(), gens, judge_cfg)
    return candidate_record(alpha, gens, judgments)


def candidate_record(alpha: float, gens: Sequence[Generation], judgments: Sequence[Judgment]) -> Candidate:
    by_key = {(j.prompt_id, j.index): j.score for j in judgments}
    scores = [by_key.get((g.prompt_id, g.index)) for g in gens]
    kept = [s for s in scores if s is not None]
    return Candidate(
        alpha=float(alpha),
        score=statistics.fmean(kept) if kept else None,
        scores=scores,
        response_chars_mean=statistics.fmean(len(g.text) for g in gens) if gens else 0.0,
        truncated_rate=sum(g.finish_reason == "length" for g in gens) / len(gens) if gens else 0.0,
    )


def search_metrics(records: Sequence[Candidate], prompts: int) -> dict[str, float]:
    metrics = {"expo/dev_prompts": float(prompts), "expo/candidates": float(len(records))}
    for r in records:
        if r.score is not None:
            metrics[f"expo/dev_score/alpha_{r.alpha:g}"] = r.score
    return metrics


def plot_search(records: Sequence[Candidate], chosen: float, out: Path, title: str) -> Path:
    """A PNG of the dev score against alpha, the chosen alpha marked, alpha = 0 as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from orchestrator.eval.plot import save_png

    xs = [r.alpha for r in records if r.score is not None]
    ys = [r.score for r in records if r.score is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, ys, "o-", label="dev score")
    base = next((r.score for r in records if r.alpha == 0 and r.score is not None), None)
    if base is not None:
        ax.axhline(base, color="grey", lw=0.8, ls=":", label="alpha = 0 (trained model)")
    pick = next(r for r in records if r.alpha == chosen)
    ax.plot([pick.alpha], [pick.score], "r*", ms=14, label=f"chosen alpha = {chosen:g}")
    ax.set(title=title, xlabel="alpha", ylabel="mean dev score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, out)


# -- dev prompts ------------------------------------------------------------------------------
def _normalise(text: str) -> str:
    from orchestrator.eval.generations import normalise

    return normalise(text)


def load_dev_prompts(path: str | None, limit: int | None, what: str) -> list[Prompt]:
    """The first ``limit`` prompts of ``path`` (None: the shipped dev set)."""
    prompts = load_prompts(path or dev_prompts_path(), what=what, source="dev")
    return prompts[: int(limit)] if limit else prompts


def refuse_overlap(dev: Sequence[Prompt], other: Sequence[str], key: str, file: Any, where: str) -> None:
    """ConfigError if a dev prompt is among ``other`` (case/whitespace-insensitive); ``key`` is the
    dev prompts' config key, ``file`` their file, ``where`` names ``other``."""
    seen = {_normalise(t) for t in other}
    shared = [p.text for p in dev if _normalise(p.text) in seen]
    if shared:
        example = shared[0] if len(shared[0]) <= 100 else shared[0][:100] + "..."
        raise ConfigError(
            f"{key}={file}: {len(shared)} of the dev prompts are among the {where} (e.g. {example!r}); alpha is chosen "
            f"on held-out prompts: remove them from one of the files or set {key} to another file"
        )


# -- config checks ----------------------------------------------------------------------------
def check_config(cfg: Any, name: str) -> None:
    """Every ``transform.NAME`` value ExPO reads is usable and the dev prompts are held out from
    the training and eval prompts; ConfigError naming the key otherwise. Runs before anything is written."""
    key = f"transform.{name}"
    node = cfg.transform[name]
    missing = [k for k in KEYS if k not in node]
    unknown = sorted(set(node) - {*KEYS, "_target_"})
    if missing or unknown:
        what = "; ".join(x for x in (missing and f"missing {', '.join(missing)}", unknown and f"unknown {', '.join(unknown)}") if x)
        raise ConfigError(f"{key}: {what} (its keys: {', '.join(KEYS)}; see conf/transforms/expo.yaml)")
    check(str(node.anchor) in ANCHORS, f"{key}.anchor", node.anchor, f"one of {', '.join(ANCHORS)}")
    check(str(node.scorer) in SCORERS, f"{key}.scorer", node.scorer, f"one of {', '.join(SCORERS)}")
    check(isinstance(node.promote, bool), f"{key}.promote", node.promote, "true or false")
    if node.alpha is not None:
        alpha = number(cfg, f"{key}.alpha")
        check(math.isfinite(alpha) and alpha >= 0, f"{key}.alpha", node.alpha, "a number >= 0, or null to search transform.expo.alphas")
        return  # a fixed alpha: no search, no dev prompts
    alphas = to_plain(node.alphas)
    want = f"a list of numbers >= 0 with at least one > 0 (alpha = 0 is always scored), or a fixed {key}.alpha"
    check(isinstance(alphas, list), f"{key}.alphas", alphas, want)
    values = []
    for a in alphas:
        try:
            values.append(float(a))
        except (TypeError, ValueError):
            raise ConfigError(f"{key}.alphas={alphas!r} is invalid: {a!r} is not a number") from None
    check(all(math.isfinite(a) and a >= 0 for a in values) and any(a > 0 for a in values), f"{key}.alphas", alphas, want)
    if str(node.scorer) == "eval_judge" and int(cfg.eval.every) <= 0:
        raise ConfigError(
            f"{key}.scorer=eval_judge scores with the fixed eval judge, which eval.every=0 turns off; "
            f"set eval.every >= 1 or {key}.scorer=judge"
        )
    dec = node.decoding
    missing = [k for k in DECODING_KEYS if k not in dec]
    if missing:
        raise ConfigError(f"{key}.decoding: missing {', '.join(missing)}")
    check(number(cfg, f"{key}.decoding.n") >= 1, f"{key}.decoding.n", dec.n, ">= 1")
    check(number(cfg, f"{key}.decoding.temperature") >= 0, f"{key}.decoding.temperature", dec.temperature, ">= 0")
    check(0 < number(cfg, f"{key}.decoding.top_p") <= 1, f"{key}.decoding.top_p", dec.top_p, "in (0, 1]")
    check(
        1 <= number(cfg, f"{key}.decoding.max_tokens") < number(cfg, "generation.engine.max_model_len"),
        f"{key}.decoding.max_tokens", dec.max_tokens, "at least 1 and below generation.engine.max_model_len",
    )
    limit = node.dev_max_prompts
    if limit is not None:
        n = number(cfg, f"{key}.dev_max_prompts")
        check(n >= 1 and n.is_integer(), f"{key}.dev_max_prompts", limit, "null (all) or a whole number >= 1")
    what = f"{key}.dev_prompts"
    dev = load_dev_prompts(node.dev_prompts, limit, what)
    check_held_out(cfg, dev, what, node.dev_prompts or dev_prompts_path())


def check_held_out(cfg: Any, dev: Sequence[Prompt], key: str, file: Any) -> None:
    """Refuse dev prompts that are among the training prompts (``data.prompts``) or the eval sets."""
    from orchestrator.eval.generations import load_eval_prompts, load_if_items

    ev = to_plain(cfg.eval)
    refuse_overlap(dev, [p.text for p in load_prompts(cfg.data.prompts)], key, file, "training prompts (data.prompts)")
    refuse_overlap(dev, [p.text for p in load_eval_prompts(ev)], key, file, "eval prompts (eval.prompts)")
    refuse_overlap(dev, [it["prompt"] for it in load_if_items(ev)], key, file, "IF eval prompts (eval.if_prompts)")


# -- the transform ----------------------------------------------------------------------------
class ExPO:
    """``transform(ctx) -> metrics``: the round's ``expo`` checkpoint, alpha searched or fixed."""

    def __init__(
        self, anchor: str, alphas: list[float], alpha: float | None, scorer: str, dev_prompts: str | None,
        dev_max_prompts: int | None, decoding: dict[str, Any], promote: bool,
    ):
        self.anchor, self.scorer, self.promote = str(anchor), str(scorer), bool(promote)
        self.alphas = [float(a) for a in alphas]
        self.alpha = None if alpha is None else float(alpha)
        self.dev_prompts, self.dev_max_prompts = dev_prompts, dev_max_prompts
        self.decoding = {k: decoding[k] for k in DECODING_KEYS}

    @classmethod
    def roles(cls, cfg: Any, name: str) -> list["Role"]:
        """No workers of its own (the policy engine serves candidates; the scorer is an existing
        role); validates the section before the run exists."""
        check_config(cfg, name)
        return []

    def __call__(self, ctx: "StageContext") -> dict[str, float]:
        rnd, ctl, t = ctx.round, ctx.ctl, ctx.round.index
        trained = rnd.state.get("checkpoints", {}).get(POLICY)
        if not trained:
            raise OrchestratorError(
                f"round {t}: transform {ctx.name} extrapolates the trained checkpoint, but the round has no {POLICY!r} checkpoint"
            )
        theta_1 = trained["path"]
        theta_0 = ctl.model_path(0 if self.anchor == "start" else t - 1)
        work = rnd.dir.path / CANDIDATES
        partial = rnd.dir.path / f"{SEARCH}.partial.jsonl"

        records: list[Candidate] = []
        chosen: Candidate | None = None
        if self.alpha is None:
            records = rnd.stage(SEARCH, Candidate, lambda: self.search(ctx, theta_0, theta_1, work, partial))
            chosen = best(records)
            alpha = chosen.alpha
        else:
            alpha = self.alpha

        def build(out: Path) -> dict[str, float]:
            kept = candidate_dir(work, alpha)
            if chosen is not None and chosen.extrapolation and (kept / "config.json").exists():
                os.replace(kept, out)  # the scored candidate itself: built once
                return dict(chosen.extrapolation)
            return extrapolate(theta_0, theta_1, alpha, out)

        path = rnd.checkpoint(CHECKPOINT, CHECKPOINT, build)
        shutil.rmtree(work, ignore_errors=True)
        partial.unlink(missing_ok=True)
        if self.promote:
            rnd.promote(CHECKPOINT)

        info = {"anchor": self.anchor, "theta_0": theta_0, "theta_1": theta_1, "alpha": alpha, "searched": self.alpha is None,
                "scorer": self.scorer if self.alpha is None else None, "checkpoint": path, "promoted": self.promote}
        ctl.store.update_round(t, expo=info)
        tags = ("anchor", "theta_0", "alpha", "scorer")
        ctl.tracker.tag_round(t, **{f"expo.{k}": v for k, v in info.items() if k in tags and v is not None})
        metrics = {"expo/anchor_is_start": float(self.anchor == "start"), "expo/searched": float(self.alpha is None),
                   "expo/promoted": float(self.promote)}
        if chosen is not None:
            trained_score = next(r.score for r in records if r.alpha == 0)
            metrics.update({"expo/dev_score_trained": trained_score, "expo/dev_score_chosen": chosen.score})
            if trained_score is not None:
                metrics["expo/dev_score_gain"] = chosen.score - trained_score
            png = plot_search(records, alpha, rnd.dir.path / PNG, f"round {t}: ExPO alpha (anchor={self.anchor}, scorer={self.scorer})")
            ctl.tracker.log_round_artifact(t, png)
        log.info("round %d: ExPO alpha=%g (anchor=%s) -> %s%s", t, alpha, self.anchor, path, " (promoted)" if self.promote else "")
        return metrics

    # -- the search stage -----------------------------------------------------------------------
    def dev_set(self, ctx: "StageContext") -> list[Prompt]:
        """The dev prompts, without any the run has trained on by now (the policy may write one)."""
        what = f"transform.{ctx.name}.dev_prompts"
        dev = load_dev_prompts(self.dev_prompts, self.dev_max_prompts, what)
        used, _ = ctx.ctl.used_prompts(before=ctx.round.index + 1)
        seen = {_normalise(p.text) for p in used}
        kept = [p for p in dev if _normalise(p.text) not in seen]
        if len(kept) < len(dev):
            log.warning("round %d: %d dev prompts are among this run's training prompts; left out", ctx.round.index, len(dev) - len(kept))
        if not kept:
            raise OrchestratorError(f"round {ctx.round.index}: every ExPO dev prompt was trained on; set {what} to another file")
        return kept

    def scorer_worker(self, ctx: "StageContext") -> Any:
        """The fixed eval judge (the same model every round) or the round's judge."""
        if self.scorer == "eval_judge":
            from orchestrator.eval.loop import fixed_judge

            return fixed_judge(ctx.ctl)
        return ctx.ctl.judge(ctx.round.index)

    def search(
        self, ctx: "StageContext", theta_0: str, theta_1: str, work: Path, partial: Path
    ) -> tuple[list[Candidate], dict[str, float]]:
        """The search stage: finished candidates from ``partial`` are reused, new ones appended to it."""
        ctl = ctx.ctl
        dev = self.dev_set(ctx)
        judge_cfg = to_plain(ctl.cfg.judge)
        done = read_jsonl(partial, Candidate) if partial.exists() else []

        def evaluate(alpha: float, path: str) -> Candidate:
            engine = ctl.workers.serve("policy", path)  # weights reloaded in place
            return score_candidate(alpha, engine, lambda: self.scorer_worker(ctx), dev, self.decoding, judge_cfg)

        records, _ = search(theta_0, theta_1, self.alphas, work, evaluate, done, save=lambda recs: write_jsonl(partial, recs))
        return records, search_metrics(records, len(dev))
