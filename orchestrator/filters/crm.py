"""CRM peer review as a pair filter (Zhang et al. 2025, "Two Minds Better Than One"; algorithms.md 6).

ADAPTATION. The paper trains *reward models*: two RMs train in parallel, each selecting for the other
the high-margin (low-loss) pairs of every batch, with an easy-to-hard curriculum; noisy pairs, hard to
fit, are left out of training. Here that co-teaching runs on the round's own pairs and its *selection*
is the product: the pairs both peers select in the final epoch go on to DPO; the peers themselves are
a by-product (kept as the round's checkpoints ``<name>_a`` / ``<name>_b`` with ``keep_checkpoints``).

What runs (workers/peer_review.py holds one peer per Ray actor, task roles ``<name>_a`` / ``<name>_b``):

* two peers from the round's starting policy, different seeds (from the plug-in's rng): Bradley-Terry
  reward models (``scorer: rm``), or DPO policies whose implicit reward is the score (``scorer: dpo``,
  CRM-DPO; reference = the round's starting policy);
* per batch B at step t, both peers score B (``margins``, in parallel); each selects for the *other*
  its ``R(t)|B|`` highest-margin pairs (lowest loss), ``R(t) = 1 - min(t / T_k * eta, eta)``,
  ``eta = noise_rate``, ``T_k = warmup_share`` of all steps; then both step in parallel on what their
  peer selected. The quota and its schedule are Co-teaching's (Han et al. 2018): UNCONFIRMED for CRM;
* curriculum (``curriculum: true``): epoch 1 in random batches; later epochs in new random batches,
  run easy to hard by the peers' mean margin (from the previous epoch) over each batch's pairs.
  The paper orders *samples* easy to hard; sorting the pairs themselves makes every late batch all
  hard (noisy) pairs, so a per-batch quota keeps R(t) of them: measured on planted noise (30% flipped),
  the kept pairs were then about as noisy as random ones (flipped share 0.23-0.28), against
  0.02-0.06 with the batch order used here, whose batches stay random samples (tests/test_crm.py);
* kept: the pairs both peers selected in the final epoch, in the input's order. Every pair's fate is
  in ``<name>_decisions.jsonl`` (kept / dropped_by_a / dropped_by_b / dropped_by_both, the margins
  that decided it and both peers' margins after training); their histogram is ``<name>_scores.png``.

How eta should be estimated is not given by the paper (its experiments inject a known noise rate):
``noise_rate`` is a setting. Each peer drops about eta of every batch, so the kept share is at most
``1 - eta``, less where the peers disagree.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Any

from orchestrator.config import to_plain
from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.placement import worker_resources
from orchestrator.plugins import Decision, StageContext, build
from orchestrator.roles import Role, call, call_each
from orchestrator.section import Section
from orchestrator.types import Pair

log = logging.getLogger(__name__)

PEERS = ("a", "b")
SCORERS = ("rm", "dpo")
# Schedules transformers.get_scheduler builds from warm-up and total steps alone.
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt")
# Config keys that change how the peers run, never what they compute: a resumed run may change them.
EXECUTION_KEYS = ("resources", "model.threads", "model.micro_batch_size", "model.eval_batch_size")


def kept_fraction(t: int, total: int, noise_rate: float, warmup_share: float) -> float:
    """R(t) = 1 - min(t / T_k * eta, eta), T_k = warmup_share * total steps: from 1 down to 1 - eta."""
    warm = warmup_share * total
    return 1.0 - (noise_rate if warm <= 0 else min(t / warm * noise_rate, noise_rate))


def quota(fraction: float, size: int) -> int:
    """How many pairs of a batch of ``size`` each peer selects: the fraction, rounded half up, at least one."""
    return max(1, min(size, math.floor(fraction * size + 0.5)))


def top(batch: list[int], margins: list[float], k: int) -> list[int]:
    """The ``k`` pairs of ``batch`` with the highest margins (ties: earlier in the batch)."""
    best = sorted(range(len(batch)), key=lambda j: -margins[j])[:k]
    return [batch[j] for j in sorted(best)]


@dataclass
class Epoch:
    """One epoch of peer review: each peer's margins on every pair as it reviewed them, what it selected."""

    margins: tuple[list[float], list[float]]
    selected: tuple[set[int], set[int]] = field(default_factory=lambda: (set(), set()))  # by a, by b (for the other)
    losses: tuple[list[float], list[float]] = field(default_factory=lambda: ([], []))


class CRMFilter:
    def __init__(
        self,
        scorer: str,
        noise_rate: float,
        warmup_share: float,
        curriculum: bool,
        min_pairs: int,
        keep_checkpoints: bool,
        model: dict[str, Any],
        dpo: dict[str, Any],
        resources: dict[str, Any],
    ):
        if scorer not in SCORERS:
            raise ConfigError(f"scorer={scorer!r} is not one of {', '.join(SCORERS)}")
        if not 0.0 <= float(noise_rate) < 1.0:
            raise ConfigError(f"noise_rate={noise_rate!r} must lie in [0, 1)")
        if not 0.0 <= float(warmup_share) <= 1.0:
            raise ConfigError(f"warmup_share={warmup_share!r} must lie in [0, 1]")
        for key, value in (("curriculum", curriculum), ("keep_checkpoints", keep_checkpoints)):
            if not isinstance(value, bool):
                raise ConfigError(f"{key}={value!r} must be true or false")
        if int(min_pairs) < 2:
            raise ConfigError(f"min_pairs={min_pairs!r} must be at least 2")
        try:
            self.batch_size, self.epochs = self._check_model(Section("filter.crm.model", model))
            beta = float(Section("filter.crm.dpo", dpo)["beta"])
        except KeyError as exc:
            raise ConfigError(f"{exc.args[0]} (conf/filters/crm.yaml)") from None
        if beta <= 0:
            raise ConfigError(f"dpo.beta={beta!r} must be > 0")
        worker_resources(resources, name="filter.crm.resources")
        self.scorer = scorer
        self.noise_rate = float(noise_rate)
        self.warmup_share = float(warmup_share)
        self.curriculum = curriculum
        self.min_pairs = int(min_pairs)
        self.keep_checkpoints = keep_checkpoints
        self.worker_cfg = {"scorer": scorer, "model": dict(model), "dpo": dict(dpo)}

    @staticmethod
    def _check_model(m: Section) -> tuple[int, int]:
        """(batch_size, epochs), once every model key the peers read is valid."""

        def positive_int(key: str, value: Any) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"model.{key}={value!r} must be a positive integer")
            return value

        batch = positive_int("batch_size", m["batch_size"])
        micro = positive_int("micro_batch_size", m["micro_batch_size"] or batch)
        if batch % micro:
            raise ConfigError(f"model.batch_size={batch} must be a multiple of model.micro_batch_size={micro}")
        positive_int("eval_batch_size", m["eval_batch_size"])
        for key in ("max_length", "train_layers", "threads"):  # null: no limit / every layer / every core
            if m[key] is not None:
                positive_int(key, m[key])
        if not float(m["learning_rate"]) > 0:
            raise ConfigError(f"model.learning_rate={m['learning_rate']!r} must be > 0")
        if float(m["weight_decay"]) < 0:
            raise ConfigError(f"model.weight_decay={m['weight_decay']!r} must be >= 0")
        for key in ("warmup_ratio", "dropout"):
            if not 0.0 <= float(m[key]) < 1.0:
                raise ConfigError(f"model.{key}={m[key]!r} must lie in [0, 1)")
        if m["lr_scheduler"] not in SCHEDULERS:
            raise ConfigError(f"model.lr_scheduler={m['lr_scheduler']!r} is not one of {', '.join(SCHEDULERS)}")
        return batch, positive_int("epochs", m["epochs"])

    @classmethod
    def roles(cls, cfg: Any, name: str) -> list[Role]:
        """The two peers' task roles; the section is checked here, so a bad value fails before the run exists."""
        spec = to_plain(cfg.filter[name])
        build("filter", name, spec)
        section = f"filter.{name}"
        resumable = tuple(f"{section}.{key}" for key in EXECUTION_KEYS)
        return [Role(f"{name}_{peer}", "task", section, dict(spec["resources"]), resumable=resumable) for peer in PEERS]

    # -- the filter -----------------------------------------------------------------------
    def __call__(self, ctx: StageContext, pairs: list[Pair]) -> tuple[list[Pair], dict[str, float]]:
        from workers.peer_review import PeerModel, planned_steps

        t0 = time.perf_counter()
        n, name = len(pairs), ctx.name
        if n < self.min_pairs:
            raise OrchestratorError(
                f"round {ctx.round.index}: filter {name} (CRM) got {n} pairs; its two peers need at least "
                f"filter.{name}.min_pairs={self.min_pairs} to train on (batch_size={self.batch_size}, epochs={self.epochs}). "
                f"Make more pairs (data.prompts_per_round, generation.n) or lower min_pairs"
            )
        total = planned_steps(n, self.batch_size, self.epochs)
        seeds = ctx.rng.sample(range(2**31), len(PEERS))  # distinct: two different heads and dropout streams
        roles = [f"{name}_{peer}" for peer in PEERS]
        released: dict[str, float] = {}
        for role in roles:
            released.update(ctx.workers.release_for(role))
        base = ctx.ctl.model_path(ctx.round.index - 1)
        records = [p.to_dict() for p in pairs]
        with ExitStack() as stack:
            peers = [stack.enter_context(ctx.workers.hold(role, PeerModel, records, base, self.worker_cfg, seed))
                     for role, seed in zip(roles, seeds)]  # fmt: skip
            epochs = self._co_teach(ctx, peers, n, total)
            final = call_each([(peer, "margins", (list(range(n)),)) for peer in peers])
            infos = call_each([(peer, "info", ()) for peer in peers])
            if self.keep_checkpoints:
                for role, peer in zip(roles, peers):
                    ctx.round.checkpoint(role, f"{role}_checkpoint", lambda out, p=peer, r=role: _saved(p, out, r))

        last = epochs[-1]
        decisions, kept = [], []
        for i, pair in enumerate(pairs):
            # margin_*: what decided the pair (the final epoch's review); final_margin_*: after training.
            margins = {"margin_a": last.margins[0][i], "margin_b": last.margins[1][i]}
            reason = _reason(i in last.selected[0], i in last.selected[1])
            decisions.append(Decision.of(pair, reason == "kept", reason, **margins, final_margin_a=final[0][i], final_margin_b=final[1][i]))
            if reason == "kept":
                kept.append(replace(pair, meta={**pair.meta, name: {"kept": True, **margins}}))
        ctx.record_decisions(decisions)
        ctx.histogram({"peer A": final[0], "peer B": final[1]}, "reward margin", "CRM peer margins")

        reasons = [d.reason for d in decisions]
        metrics = {
            f"{name}/in": float(n),
            f"{name}/kept": float(len(kept)),
            f"{name}/kept_ratio": len(kept) / n,
            **{f"{name}/{r}": float(reasons.count(r)) for r in ("dropped_by_a", "dropped_by_b", "dropped_by_both")},
            # Final epoch: both keep or both drop; after training: both margins on the same side of 0.
            f"{name}/agreement": sum(r in ("kept", "dropped_by_both") for r in reasons) / n,
            f"{name}/sign_agreement": sum((a > 0) == (b > 0) for a, b in zip(*final)) / n,
            f"{name}/noise_rate": self.noise_rate,
            f"{name}/final_kept_fraction": kept_fraction(total - 1, total, self.noise_rate, self.warmup_share),
            f"{name}/epochs": float(self.epochs),
            f"{name}/steps": float(total),
            **released,
        }
        for peer, margins, epoch_losses, info in zip(PEERS, final, last.losses, infos):
            metrics[f"{name}/{peer}/accuracy"] = sum(m > 0 for m in margins) / n
            metrics[f"{name}/{peer}/loss"] = statistics.fmean(_bt_loss(m) for m in margins)
            metrics[f"{name}/{peer}/train_loss_last_epoch"] = statistics.fmean(epoch_losses)
            metrics[f"{name}/{peer}/load_s"] = info["load_s"]
        if all("planted_flip" in p.meta for p in pairs):  # planted-noise runs: the flipped share before and after
            metrics[f"{name}/flipped_in"] = sum(bool(p.meta["planted_flip"]) for p in pairs) / n
            metrics[f"{name}/flipped_kept"] = sum(bool(p.meta["planted_flip"]) for p in kept) / len(kept) if kept else 0.0
        metrics[f"{name}/time_s"] = time.perf_counter() - t0
        log.info(
            "%s: kept %d of %d pairs (agreement %.2f, peer accuracy %.2f / %.2f) in %.1fs", name, len(kept), n,
            metrics[f"{name}/agreement"], metrics[f"{name}/a/accuracy"], metrics[f"{name}/b/accuracy"], metrics[f"{name}/time_s"],
        )  # fmt: skip
        return kept, metrics

    def _co_teach(self, ctx: StageContext, peers: list[Any], n: int, total: int) -> list[Epoch]:
        """Every epoch of peer review; each step: both score the batch, then each trains on its peer's selection."""
        a, b = peers
        epochs: list[Epoch] = []
        t = 0
        for index in range(self.epochs):
            epoch = Epoch(margins=([math.nan] * n, [math.nan] * n))
            for batch in self._batches(ctx, n, epochs[-1] if epochs else None):
                ma, mb = call_each([(a, "margins", (batch,)), (b, "margins", (batch,))])
                k = quota(kept_fraction(t, total, self.noise_rate, self.warmup_share), len(batch))
                by_a, by_b = top(batch, ma, k), top(batch, mb, k)
                sa, sb = call_each([(a, "step", (by_b,)), (b, "step", (by_a,))])  # each learns from its peer's selection
                for i, x, y in zip(batch, ma, mb):
                    epoch.margins[0][i], epoch.margins[1][i] = x, y
                epoch.selected[0].update(by_a)
                epoch.selected[1].update(by_b)
                epoch.losses[0].append(sa["loss"])
                epoch.losses[1].append(sb["loss"])
                t += 1
            epochs.append(epoch)
            both = len(epoch.selected[0] & epoch.selected[1])
            log.info("%s: epoch %d/%d: selected by both %d of %d, step loss A %.3f B %.3f", ctx.name, index + 1, self.epochs,
                     both, n, statistics.fmean(epoch.losses[0]), statistics.fmean(epoch.losses[1]))  # fmt: skip
        return epochs

    def _batches(self, ctx: StageContext, n: int, previous: Epoch | None) -> list[list[int]]:
        """A random partition into batches; with the curriculum (after epoch 1) run easy to hard.

        Easy = the peers' mean margin in the previous epoch, averaged over the batch. The batches stay
        random samples, so a batch's quota drops its hardest pairs, not whole hard batches' worth.
        """
        order = list(range(n))
        ctx.rng.shuffle(order)
        batches = [order[s : s + self.batch_size] for s in range(0, n, self.batch_size)]
        if self.curriculum and previous is not None:
            ease = [(x + y) / 2 for x, y in zip(*previous.margins)]
            batches.sort(key=lambda batch: -statistics.fmean(ease[i] for i in batch))
        return batches


def _reason(by_a: bool, by_b: bool) -> str:
    if by_a and by_b:
        return "kept"
    if by_a or by_b:
        return "dropped_by_b" if by_a else "dropped_by_a"
    return "dropped_by_both"


def _bt_loss(margin: float) -> float:
    """-log sigmoid(margin), stable for large |margin|."""
    return max(-margin, 0.0) + math.log1p(math.exp(-abs(margin)))


def _saved(peer: Any, out: Any, role: str) -> dict[str, float]:
    result = call(peer, "save", str(out))
    return {f"{role}/{key}": float(value) for key, value in result.items()}
