"""The per-round eval stage: held-out generations, win rates vs the start and the previous round,
IF accuracy and judge agreement.

Round 0 is the starting model. For round r the policy (serving the weights after round r) writes
one response per held-out prompt and per IF prompt with ``eval.decoding`` (greedy by default);
they are cached in ``rounds/round_XXX/eval_generations.jsonl`` (atomic) so a resumed run never
redoes them. Then:

- the fixed judge (``eval.judge``; it never changes over rounds) compares round r's responses
  with round 0's (``vs_start``) and with the latest earlier evaluated round's (``vs_prev``; the
  same pairs as vs_start when that is round 0), both orders per pair (see pairwise.py), giving
  raw and length-controlled win rates with standard errors (lc_winrate.py);
- IF prompt- and check-level accuracy (ifeval.py, strict; loose too with ``eval.if_loose``);
- judge reliability: the round's model as a judge (the Self-Rewarding judge of the next round)
  on the vs_start pairs, agreement with the fixed judge's decisions, and its parse rate; plus the
  round's own judge-stage ``judge/parse_rate`` when there is one.

Win rates are percent (0-100); accuracies, agreement and rates are fractions (0-1). At round 0
the vs_start win rates are 50 by construction (the model against itself).

Workers are anything with the ``EvalWorker`` methods, called through ``call(worker, method, ...)``
(the controller's ``call`` reaches Ray actors; the default calls a local object).

Entry points: ``eval_stage(...) -> (records, metrics)`` (pure: writes only the generation cache),
``run_eval(...) -> metrics`` (also writes eval.jsonl / eval.metrics.json, skips a finished eval),
and, for the round loop, ``evaluate_round(ctl, rnd)`` (the controller's ``evaluate`` hook: round 0
on first use, the fixed judge worker, MLflow logging through ``Round.stage``, the PNG artifact)
plus ``preflight(cfg, train_prompts)`` to refuse train/eval overlap before the first round.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.eval import ifeval, lc_winrate, pairwise
from orchestrator.store import RoundDir, RunStore, read_jsonl, write_jsonl
from orchestrator.types import Completion, Generation, GenerationRequest, Judgment, Prompt, Record

log = logging.getLogger(__name__)

GENERATIONS_FILE = "eval_generations.jsonl"
STAGE = "eval"
JUDGE_STAGES = ("judgments", "judge")

DEFAULTS: dict[str, Any] = {
    "every": 1,
    "prompts": None,
    "max_prompts": 64,
    "if_prompts": None,
    "if_max_prompts": None,
    "if_loose": True,
    "decoding": {"temperature": 0.0, "top_p": 1.0, "max_tokens": 256},
    "judge": {"model": "start"},
    "pairwise": dict(pairwise.DEFAULTS),
    "lc": {"penalty": "l2", "C": 100.0, "se": "bootstrap", "bootstrap": 200, "seed": 0},
    "agreement": {"method": "pointwise", "enabled": True},
}


class EvalWorker(Protocol):
    """What the stage needs from a worker (workers/vllm_worker.py ``VLLMWorker`` or an endpoint client)."""

    def generate(self, request: GenerationRequest) -> list[Completion]: ...

    def choice_probs(
        self, prompts: list[str], choices: list[str], assistant_prefix: str = "", chat: bool = True
    ) -> list[dict[str, float] | None]: ...


class ScoringWorker(EvalWorker, Protocol):
    """Also the Self-Rewarding judge (``agreement.method: pointwise``)."""

    def score(self, generations: list[Generation], judge_cfg: dict[str, Any]) -> list[Judgment]: ...


@dataclass
class EvalRecord(Record):
    """One line of ``eval.jsonl``: a judged pair (kind "pair") or an IF prompt's checks (kind "if")."""

    kind: str
    prompt_id: str
    comparison: str = ""  # "vs_start" / "vs_prev" for pairs
    baseline_round: int = -1
    preference: float | None = None  # fixed judge: P(this round's response is better)
    p_model_first: float | None = None
    p_model_second: float | None = None
    model_chars: int = 0
    baseline_chars: int = 0
    policy_preference: float | None = None  # the round's model as a judge (vs_start pairs)
    checks: list[bool] = field(default_factory=list)  # IF: one result per check (strict)
    passed: bool | None = None


# -- config helpers ---------------------------------------------------------------------------
def eval_config(cfg: Any) -> dict[str, Any]:
    """The ``eval`` section (a DictConfig or dict; the whole config is accepted too) over DEFAULTS."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra
        pass
    cfg = dict(cfg or {})
    if "eval" in cfg and isinstance(cfg["eval"], dict) and "every" not in cfg:
        cfg = dict(cfg["eval"])
    out = {**DEFAULTS, **cfg}
    for key in ("decoding", "judge", "pairwise", "lc", "agreement"):
        out[key] = {**DEFAULTS[key], **(cfg.get(key) or {})}
    if out["pairwise"]["mode"] not in pairwise.MODES:
        raise ConfigError(f"eval.pairwise.mode={out['pairwise']['mode']!r}: want one of {', '.join(pairwise.MODES)}")
    if out["lc"]["penalty"] not in lc_winrate.PENALTIES:
        raise ConfigError(f"eval.lc.penalty={out['lc']['penalty']!r}: want one of {', '.join(lc_winrate.PENALTIES)}")
    if out["lc"]["se"] not in lc_winrate.SE_METHODS:
        raise ConfigError(f"eval.lc.se={out['lc']['se']!r}: want one of {', '.join(lc_winrate.SE_METHODS)}")
    if out["agreement"]["method"] not in ("pointwise", "pairwise"):
        raise ConfigError(f"eval.agreement.method={out['agreement']['method']!r}: want pointwise or pairwise")
    if int(out["every"]) < 0:
        raise ConfigError(f"eval.every={out['every']}: want 0 (off) or a positive number of rounds")
    return out


def eval_due(round_index: int, cfg: Any, total_rounds: int) -> bool:
    """Whether round ``round_index`` is evaluated: never with every=0; otherwise round 0 (the
    starting model), every ``every``-th round and the last round."""
    every = int(eval_config(cfg)["every"])
    if every <= 0:
        return False
    return round_index == 0 or round_index % every == 0 or round_index == int(total_rounds)


# -- train/eval overlap ------------------------------------------------------------------------
def normalise(text: str) -> str:
    return " ".join(str(text).lower().split())


def _texts(items: Sequence[Any]) -> list[str]:
    out = []
    for it in items:
        if isinstance(it, str):
            out.append(it)
        elif isinstance(it, Prompt):
            out.append(it.text)
        elif isinstance(it, Mapping):
            out.append(str(it.get("prompt", it.get("text", ""))))
        else:
            out.append(str(getattr(it, "text", it)))
    return out


def check_no_overlap(eval_texts: Sequence[Any], train_texts: Sequence[Any], what: str = "eval prompts") -> None:
    """Refuse eval prompts that also appear among the training prompts (case/whitespace-insensitive)."""
    train = {normalise(t) for t in _texts(train_texts)}
    shared = [t for t in _texts(eval_texts) if normalise(t) in train]
    if shared:
        example = shared[0] if len(shared[0]) <= 100 else shared[0][:100] + "..."
        raise ConfigError(
            f"{len(shared)} of the {what} also appear among the training prompts (e.g. {example!r}); "
            f"held-out prompts must never be trained on: remove them from data.prompts or point eval.prompts elsewhere"
        )


# -- prompts and generations ----------------------------------------------------------------------
def load_eval_prompts(cfg: Mapping[str, Any]) -> list[Prompt]:
    from orchestrator.data import eval_prompts_path, load_prompts

    path = cfg.get("prompts") or eval_prompts_path()
    prompts = load_prompts(path, what="eval.prompts", source="eval")
    n = cfg.get("max_prompts")
    return prompts[: int(n)] if n else prompts


def load_if_items(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    n = cfg.get("if_max_prompts")
    if n is not None and int(n) == 0:
        return []
    try:
        return ifeval.load_items(cfg.get("if_prompts"), int(n) if n else None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"eval.if_prompts={cfg.get('if_prompts') or ifeval.DATA_FILE}: {exc}") from None


def _gen_key(rec: Mapping[str, Any]) -> tuple[str, str]:
    return rec["set"], rec["prompt_id"]


def read_generations(rdir: RoundDir) -> dict[tuple[str, str], dict[str, Any]]:
    path = rdir.path / GENERATIONS_FILE
    return {_gen_key(r): r for r in read_jsonl(path)} if path.exists() else {}


def generate_cached(
    policy: Any,
    rdir: RoundDir,
    wanted: Sequence[tuple[str, str, str]],
    decoding: Mapping[str, Any],
    call: Callable[..., Any] = pairwise.direct_call,
) -> tuple[dict[tuple[str, str], dict[str, Any]], int]:
    """One response per (set, prompt_id, text) in ``wanted``; cached ones are reused.

    Returns (all cached responses by (set, prompt_id), how many were generated now).
    """
    cache = read_generations(rdir)
    # A cached response counts only for the same prompt text (a changed prompt file is redone).
    missing = [w for w in wanted if (w[0], w[1]) not in cache or cache[(w[0], w[1])]["prompt"] != w[2]]
    if missing:
        request = GenerationRequest(
            prompts=[text for _, _, text in missing],
            n=1,
            temperature=float(decoding["temperature"]),
            top_p=float(decoding["top_p"]),
            max_tokens=int(decoding["max_tokens"]),
            chat=True,
        )
        completions = call(policy, "generate", request)
        if len(completions) != len(missing):
            raise OrchestratorError(f"eval: the policy returned {len(completions)} completions for {len(missing)} prompts")
        for (kind, pid, text), comp in zip(missing, completions):
            cache[(kind, pid)] = {
                "set": kind,
                "prompt_id": pid,
                "prompt": text,
                "text": comp.texts[0],
                "num_tokens": int(comp.num_tokens[0]),
                "finish_reason": str(comp.finish_reasons[0]),
            }
        write_jsonl(rdir.path / GENERATIONS_FILE, list(cache.values()))
    return cache, len(missing)


# -- comparisons ----------------------------------------------------------------------------
def _baseline_rounds(store: RunStore, round_index: int) -> tuple[int, int]:
    """(start round 0, the latest earlier round with eval generations, else 0)."""
    start = store.round(0)
    if not (start.path / GENERATIONS_FILE).exists():
        raise OrchestratorError(
            f"eval: round {round_index} is compared with the starting model, but {start.path / GENERATIONS_FILE} "
            f"does not exist; evaluate round 0 first (the round loop does when eval.every > 0)"
        )
    prev = 0
    for k in range(round_index - 1, 0, -1):
        if (store.round(k).path / GENERATIONS_FILE).exists():
            prev = k
            break
    return 0, prev


def _compare(
    fixed_judge: Any,
    ours: Mapping[tuple[str, str], dict[str, Any]],
    theirs: Mapping[tuple[str, str], dict[str, Any]],
    prompt_ids: Sequence[str],
    cfg: Mapping[str, Any],
    call: Callable[..., Any],
) -> tuple[list[str], list[pairwise.PairVerdict], list[str], list[str]]:
    ids = [
        pid for pid in prompt_ids
        if ("eval", pid) in ours and ("eval", pid) in theirs and ours[("eval", pid)]["prompt"] == theirs[("eval", pid)]["prompt"]
    ]
    instr = [ours[("eval", pid)]["prompt"] for pid in ids]
    mine = [ours[("eval", pid)]["text"] for pid in ids]
    base = [theirs[("eval", pid)]["text"] for pid in ids]
    verdicts = pairwise.judge_pairs(fixed_judge, instr, mine, base, cfg["pairwise"], call=call)
    return ids, verdicts, mine, base


def _winrate_metrics(prefix: str, verdicts: Sequence[pairwise.PairVerdict], mine: Sequence[str], base: Sequence[str], lc: Mapping[str, Any]) -> dict[str, float]:
    keep = [i for i, v in enumerate(verdicts) if v.preference is not None]
    metrics: dict[str, float] = {
        f"{prefix}pairs": float(len(verdicts)),
        f"{prefix}judge_valid_rate": len(keep) / len(verdicts) if verdicts else 0.0,
        f"{prefix}identical_rate": sum(v.identical for v in verdicts) / len(verdicts) if verdicts else 0.0,
    }
    if not keep:
        return metrics
    res = lc_winrate.lc_winrate(
        [verdicts[i].preference for i in keep],
        [len(mine[i]) for i in keep],
        [len(base[i]) for i in keep],
        penalty=str(lc["penalty"]),
        C=float(lc["C"]),
        se_method=str(lc["se"]),
        bootstrap=int(lc["bootstrap"]),
        seed=int(lc["seed"]),
    )
    metrics.update(
        {
            f"{prefix}winrate": res["winrate"],
            f"{prefix}winrate_se": res["winrate_se"],
            f"{prefix}lc_winrate": res["lc_winrate"],
            f"{prefix}lc_winrate_se": res["lc_winrate_se"],
            f"{prefix}glm_phi": res["glm_phi"],
        }
    )
    return metrics


def _policy_preferences(
    policy: Any,
    ids: Sequence[str],
    instr: Sequence[str],
    mine: Sequence[str],
    base: Sequence[str],
    cfg: Mapping[str, Any],
    judge_cfg: Mapping[str, Any] | None,
    call: Callable[..., Any],
) -> tuple[list[float | None], float | None]:
    """The round's model as a judge on the same pairs: (preferences, its parse rate)."""
    method = cfg["agreement"]["method"]
    if method == "pointwise" and judge_cfg is None:
        log.warning("eval: agreement.method=pointwise needs the judge config; using pairwise")
        method = "pairwise"
    if method == "pairwise":
        verdicts = pairwise.judge_pairs(policy, instr, mine, base, cfg["pairwise"], call=call)
        prefs = [v.preference for v in verdicts]
        valid = [v for v in verdicts if not v.identical]
        rate = (sum(v.orders for v in valid) / (2 * len(valid))) if valid else None
        return prefs, rate
    gens = []
    for pid, q, a, b in zip(ids, instr, mine, base):
        gens.append(Generation(prompt_id=pid, prompt=q, index=0, text=a, num_tokens=0, source="eval"))
        gens.append(Generation(prompt_id=pid, prompt=q, index=1, text=b, num_tokens=0, source="eval"))
    judgments = call(policy, "score", gens, dict(judge_cfg)) if gens else []
    scores = [j.score for j in judgments]
    rate = sum(s is not None for s in scores) / len(scores) if scores else None
    return pairwise.pointwise_preferences(scores[0::2], scores[1::2]), rate


# -- the stage ------------------------------------------------------------------------------
def eval_stage(
    *,
    round_index: int,
    policy: Any,
    fixed_judge: Any,
    store: RunStore,
    cfg: Any,
    train_prompts: Sequence[Any] = (),
    judge_cfg: Mapping[str, Any] | None = None,
    call: Callable[..., Any] = pairwise.direct_call,
) -> tuple[list[EvalRecord], dict[str, float]]:
    """Evaluate the model that ``policy`` serves now as round ``round_index``; returns (records, metrics).

    Writes only the generation cache; the caller writes ``eval.jsonl`` (``run_eval`` does, or the
    controller's ``Round.stage("eval", EvalRecord, ...)``). ``cfg``: the ``eval`` config section;
    ``train_prompts``: every prompt the run trains on (texts, Prompt objects or dicts);
    ``judge_cfg``: the run's ``judge`` section (for the pointwise agreement judge).
    """
    t0 = time.perf_counter()
    c = eval_config(cfg)
    rdir = store.round(round_index)
    prompts = load_eval_prompts(c)
    items = load_if_items(c)
    check_no_overlap([p.text for p in prompts], train_prompts, what="eval prompts")
    check_no_overlap([it["prompt"] for it in items], train_prompts, what="IF eval prompts")

    wanted = [("eval", p.id, p.text) for p in prompts] + [("if", it["id"], it["prompt"]) for it in items]
    gens, generated = generate_cached(policy, rdir, wanted, c["decoding"], call=call)
    t_gen = time.perf_counter() - t0
    eval_gens = [gens[("eval", p.id)] for p in prompts]
    all_gens = [gens[(k, pid)] for k, pid, _ in wanted]
    metrics: dict[str, float] = {
        "eval/prompts": float(len(prompts)),
        "eval/if_prompts": float(len(items)),
        "eval/generated": float(generated),
        "eval/response_chars_mean": statistics.fmean(len(g["text"]) for g in eval_gens) if eval_gens else 0.0,
        "eval/response_tokens_mean": statistics.fmean(g["num_tokens"] for g in eval_gens) if eval_gens else 0.0,
        "eval/truncated_rate": sum(g["finish_reason"] == "length" for g in all_gens) / len(all_gens) if all_gens else 0.0,
    }
    records: list[EvalRecord] = []

    # Instruction following.
    if items:
        responses = {it["id"]: gens[("if", it["id"])]["text"] for it in items}
        metrics.update({f"eval/{k}": v for k, v in ifeval.evaluate_if(responses, items).items()})
        if c["if_loose"]:
            metrics.update({f"eval/{k}": v for k, v in ifeval.evaluate_if(responses, items, loose=True).items()})
        for it in items:
            results = ifeval.check_response(it, responses[it["id"]])
            records.append(EvalRecord(kind="if", prompt_id=it["id"], checks=results, passed=all(results)))

    # Win rates against the start and the previous evaluated round.
    t1 = time.perf_counter()
    ids = [p.id for p in prompts]
    if round_index == 0:
        metrics.update(
            {
                "eval/vs_start/winrate": 50.0, "eval/vs_start/winrate_se": 0.0,
                "eval/vs_start/lc_winrate": 50.0, "eval/vs_start/lc_winrate_se": 0.0,
            }
        )
    else:
        start, prev = _baseline_rounds(store, round_index)
        start_gens = read_generations(store.round(start))
        pair_ids, verdicts, mine, base = _compare(fixed_judge, gens, start_gens, ids, c, call)
        metrics.update(_winrate_metrics("eval/vs_start/", verdicts, mine, base, c["lc"]))
        comparisons = [("vs_start", start, pair_ids, verdicts, mine, base)]
        if prev == start:
            prev_metrics = {k.replace("/vs_start/", "/vs_prev/"): v for k, v in metrics.items() if "/vs_start/" in k}
            metrics.update(prev_metrics)
        else:
            p_ids, p_verdicts, p_mine, p_base = _compare(fixed_judge, gens, read_generations(store.round(prev)), ids, c, call)
            metrics.update(_winrate_metrics("eval/vs_prev/", p_verdicts, p_mine, p_base, c["lc"]))
            comparisons.append(("vs_prev", prev, p_ids, p_verdicts, p_mine, p_base))
        metrics["eval/prev_round"] = float(prev)

        # Judge reliability: the round's model as a judge on the vs_start pairs.
        policy_prefs: list[float | None] = [None] * len(pair_ids)
        if c["agreement"].get("enabled", True) and pair_ids:
            judged = [i for i, v in enumerate(verdicts) if not v.identical]
            if judged:
                instr = [gens[("eval", pair_ids[i])]["prompt"] for i in judged]
                prefs, rate = _policy_preferences(
                    policy, [pair_ids[i] for i in judged], instr, [mine[i] for i in judged], [base[i] for i in judged], c, judge_cfg, call
                )
                for i, p in zip(judged, prefs):
                    policy_prefs[i] = p
                agree, n_agree = pairwise.agreement([verdicts[i].preference for i in judged], prefs)
                metrics["eval/judge_agreement_pairs"] = float(n_agree)
                if agree is not None:
                    metrics["eval/judge_agreement"] = agree
                if rate is not None:
                    metrics["eval/policy_judge_parse_rate"] = rate

        for name, base_round, p_ids, vs, m, b in comparisons:
            for i, (pid, v) in enumerate(zip(p_ids, vs)):
                records.append(
                    EvalRecord(
                        kind="pair", prompt_id=pid, comparison=name, baseline_round=base_round,
                        preference=v.preference, p_model_first=v.p_model_first, p_model_second=v.p_model_second,
                        model_chars=len(m[i]), baseline_chars=len(b[i]),
                        policy_preference=policy_prefs[i] if name == "vs_start" else None,
                    )
                )
    # The round's own judge stage (Self-Rewarding: "judgments"), when this round had one.
    rate = next((rdir.metrics(s).get("judge/parse_rate") for s in JUDGE_STAGES if "judge/parse_rate" in rdir.metrics(s)), None)
    if rate is not None:
        metrics["eval/judge_parse_rate"] = float(rate)
    metrics["time/eval_generate_s"] = t_gen
    metrics["time/eval_judge_s"] = time.perf_counter() - t1
    return records, metrics


def run_eval(
    *,
    round_index: int,
    policy: Any,
    fixed_judge: Any,
    store: RunStore,
    cfg: Any,
    train_prompts: Sequence[Any] = (),
    judge_cfg: Mapping[str, Any] | None = None,
    call: Callable[..., Any] = pairwise.direct_call,
) -> dict[str, float]:
    """``eval_stage`` plus ``eval.jsonl`` / ``eval.metrics.json``; a finished eval is not redone."""
    rdir = store.round(round_index)
    if rdir.has(STAGE):
        log.info("round %d: eval already done, reusing %s", round_index, rdir.metrics_file(STAGE))
        return rdir.metrics(STAGE)
    t0 = time.perf_counter()
    records, metrics = eval_stage(
        round_index=round_index, policy=policy, fixed_judge=fixed_judge, store=store, cfg=cfg,
        train_prompts=train_prompts, judge_cfg=judge_cfg, call=call,
    )
    metrics["time/eval_s"] = time.perf_counter() - t0
    rdir.write(STAGE, records, metrics)
    return metrics


def summary_line(round_index: int, metrics: Mapping[str, float]) -> str:
    """One log line with the headline numbers."""
    def f(key: str, fmt: str = "{:.1f}") -> str:
        return fmt.format(metrics[key]) if key in metrics else "-"

    return (
        f"round {round_index} eval: win rate vs start {f('eval/vs_start/winrate')} "
        f"(LC {f('eval/vs_start/lc_winrate')} ± {f('eval/vs_start/lc_winrate_se')}), "
        f"vs prev {f('eval/vs_prev/winrate')}, IF prompt acc {f('eval/if/prompt_accuracy', '{:.3f}')}, "
        f"judge agreement {f('eval/judge_agreement', '{:.3f}')}"
    )



# -- the round loop (controller) -----------------------------------------------------------------
def preflight(cfg: Any, train_prompts: Sequence[Any]) -> None:
    """Before the first round: the eval config is valid, its prompt sets load, and none of them
    is among ``train_prompts`` (ConfigError otherwise). A no-op with ``eval.every=0``."""
    c = eval_config(cfg)
    if int(c["every"]) <= 0:
        return
    check_no_overlap([p.text for p in load_eval_prompts(c)], train_prompts, what="eval prompts")
    check_no_overlap([it["prompt"] for it in load_if_items(c)], train_prompts, what="IF eval prompts")


def fixed_judge(ctl: Any, cfg: Any = None) -> Any:
    """The eval judge worker, made once per controller and kept on it as ``ctl._eval_judge``.

    ``eval.judge.endpoint.base_url`` set: an OpenAI-compatible endpoint client; ``model: start``:
    a second vLLM engine on the starting model; otherwise a vLLM engine on that checkpoint path.
    The engine takes ``generation.engine`` with ``eval.judge.engine`` over it (a small KV cache).
    """
    judge = getattr(ctl, "_eval_judge", None)
    if judge is not None:
        return judge
    from omegaconf import OmegaConf

    from orchestrator.controller import plain

    c = eval_config(cfg if cfg is not None else ctl.cfg.eval)
    jc = c["judge"]
    endpoint = jc.get("endpoint") or {}
    if endpoint.get("base_url"):
        from workers.endpoint import EndpointWorker

        judge = EndpointWorker(dict(endpoint))
    else:
        from orchestrator.models import resolve_model_path

        spec = str(jc.get("model") or "start")
        if spec == "start":
            path = ctl.model_path(0)
        else:
            path = resolve_model_path(
                {"name": "eval_judge", "path": spec, "gguf": None, "cache_dir": ctl.cfg.model.cache_dir}, what="eval.judge.model"
            )
        engine = {**plain(ctl.cfg.generation.engine), **(jc.get("engine") or {})}
        resources = OmegaConf.create({"num_cpus": 0, "num_gpus": 0, **(jc.get("resources") or {})})
        log.info("eval: starting the fixed judge on %s", path)
        judge = ctl.start_engine(path, engine, resources, "the fixed eval judge's vLLM engine")
    ctl._eval_judge = judge
    return judge


def shutdown_fixed_judge(ctl: Any) -> None:
    judge = getattr(ctl, "_eval_judge", None)
    if judge is None:
        return
    ctl._eval_judge = None
    try:
        from orchestrator.controller import call

        call(judge, "shutdown")
    except Exception:  # the worker may be gone already; nothing left to release then
        pass
    if hasattr(judge, "__ray_terminate__"):
        import ray

        ray.kill(judge)


def training_prompts(ctl: Any, up_to: int) -> list[Prompt]:
    """The run's prompt pool (``data.prompts``) and every prompt of rounds 1..``up_to``."""
    from orchestrator.data import load_prompts

    pool = load_prompts(ctl.cfg.data.prompts)
    used, _ = ctl.used_prompts(before=up_to + 1)
    return pool + used


def evaluate_round(ctl: Any, rnd: Any) -> dict[str, float] | None:
    """The controller's ``evaluate`` hook, at the end of round ``rnd.index`` (after training).

    Evaluates round 0 first if it has not been (the policy worker still serves the starting model
    then, so no reload), then the new checkpoint (``ctl.policy(t + 1)`` serves the weights after
    round t; the next round's ``ctl.policy(t + 1)`` is then a no-op). Both go through
    ``Round.stage("eval", ...)``: resumable, metrics on the round's child run and the parent with
    step=round. Round 0 gets its own child run (round_000). Writes and logs RUN_DIR/eval_metrics.png.
    """
    from orchestrator.controller import Round, call, plain
    from orchestrator.eval.plot import plot_run

    c = eval_config(ctl.cfg.eval)
    total = int(ctl.cfg.rounds)
    if not eval_due(rnd.index, c, total):
        return None
    train = training_prompts(ctl, rnd.index)
    judge_cfg = plain(ctl.cfg.judge)
    common = dict(store=ctl.store, cfg=c, train_prompts=train, judge_cfg=judge_cfg, call=call)

    start = Round(ctl, 0)
    if not start.dir.has(STAGE) or STAGE not in start.state.get("logged", []):
        start.stage(STAGE, EvalRecord, lambda: eval_stage(round_index=0, policy=ctl.policy(1), fixed_judge=fixed_judge(ctl, c), **common))
        ctl.tracker.end_round(0)
        log.info(summary_line(0, start.dir.metrics(STAGE)))
    rnd.stage(
        STAGE, EvalRecord,
        lambda: eval_stage(round_index=rnd.index, policy=ctl.policy(rnd.index + 1), fixed_judge=fixed_judge(ctl, c), **common),
    )
    metrics = rnd.dir.metrics(STAGE)
    log.info(summary_line(rnd.index, metrics))
    png = plot_run(ctl.store.root)
    if png is not None:
        ctl.tracker.log_artifact(png)
    if rnd.index >= total:
        shutdown_fixed_judge(ctl)
    return metrics

__all__ = [
    "EvalRecord", "EvalWorker", "GENERATIONS_FILE", "check_no_overlap", "eval_config", "eval_due",
    "eval_stage", "evaluate_round", "fixed_judge", "preflight", "run_eval", "shutdown_fixed_judge", "summary_line",
]
