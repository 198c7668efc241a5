"""ALMA: Alignment with Minimal Annotation (Yasunaga et al. 2024; algorithms.md 3), R feedback rounds.

    D1       <- the SFT seed (alma.sft_seed); the judge's seed: responses rated 0-10 (alma.judge.seed_ratings)
    round 1 also, once:
      pool   <- the base model M0 writes prompts, few-shot from 3-5 random seed prompts; dedup   prompt_pool
      C      <- k-means (alma.clusters) over M0's hidden states of the pool's prompts          prompt_clusters
      M1(1), M1(2) <- SFT(M0, D1), two seeds                                             checkpoints sft_1, sft_2
      J0     <- SFT(M0, seed ratings; held-out prompts excepted)                           checkpoint judge_seed
    for t = 1 .. R:                                                           (our round t is the paper's t + 1)
      x      <- K clusters of C at random, one prompt never used before from each                  prompts
      y      <- N responses per x, 1:1:1 from M1(1), M1(2) and (t >= 2) M_{t-1}          generations_<checkpoint>
      J      <- t = 1: J0 rates alma.judge.distill.size of the y, J = SFT(J0, its own rounded ratings)
                (self-distillation; accuracy on the held-out seed ratings before and after)   checkpoint judge
                later rounds keep round 1's J (alma.judge.refresh=true distils it further each round)
      s(y)   <- J's real-valued rating sum_s s * p(s), s = 0..10, renormalised                    judgments
      D_t    <- per x, the best-of-N response                                                       best_of_n
      M_t    <- SFT(M0, D1 u D_1 u ... u D_t): the BASE model, all rounds' data  (alma.train=sft)  checkpoint policy
                DPO(M_{t-1}, or M1(1) at t = 1; best vs random lower pairs)      (alma.train=dpo)
      evaluate M_t on held-out prompts

Every stage is a JSONL file (or a named checkpoint) of its round, so a killed run resumes at the
first missing one; the pool, its clusters and the four round-1 checkpoints live in round 1 and later
rounds read them. N, K and R go to the manifest (``rounds.T.alma``) and to MLflow (``alma/N`` ...).
Per round MLflow also gets each checkpoint's share of best-of-N winners (``alma/winner_share/*``),
the judge's accuracy on held-out seed ratings before and after self-distillation
(``alma/judge_before/*``, ``alma/judge_after/*``), the prompt-cluster coverage
(``alma/cluster_coverage``) and the kept responses' score distribution (``alma/kept_score_*``,
``alma_scores.png``). Every departure from the paper, with its reason: docs/alma.md.
"""

from __future__ import annotations

import random
import statistics
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from orchestrator import chat, clusters, plugins, rating, rounds, stages
from orchestrator import eval as evaluation
from orchestrator.config import check, number, to_plain
from orchestrator.controller import Controller, Round
from orchestrator.data import alma_seed_ratings_path, alma_sft_seed_path, load_demonstrations
from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.pairs import best_of_n, best_vs_random, pair_metrics
from orchestrator.roles import Role, call, core_roles, vllm_role
from orchestrator.training import train_dpo, train_sft
from orchestrator.types import Demonstration, Generation, Judgment, Pair, Prompt

SFT = ("sft_1", "sft_2")  # the initial SFT checkpoints M1(1), M1(2): each a checkpoint of round 1 and a role
LATEST = "latest"  # the source name of the previous round's policy M_{t-1} (served by the policy role)
JUDGE = "alma_judge"  # the judge's role
EMBEDDER = "embedder"  # the task role that embeds the pool's prompts
TRAINS = ("sft", "dpo")
ENGINES = ("swap", "own")
SCORES_PNG = "alma_scores.png"


def validate(cfg: DictConfig) -> None:
    """The ``alma`` section's values (ConfigError naming the key); run before anything is written."""
    check("alma" in cfg and OmegaConf.is_dict(cfg.alma), "alma", cfg.get("alma"), "the recipe's section; use +experiment=alma")
    al = cfg.alma

    def whole(key: str, least: int) -> None:
        value = OmegaConf.select(cfg, key)
        ok = not isinstance(value, bool) and number(cfg, key).is_integer() and number(cfg, key) >= least
        check(ok, key, value, f"a whole number >= {least}")

    def fraction(key: str) -> None:
        check(0 <= number(cfg, key) <= 1, key, OmegaConf.select(cfg, key), "in [0, 1]")

    check(al.train in TRAINS, "alma.train", al.train, f"one of {', '.join(TRAINS)}")
    check(al.engines in ENGINES, "alma.engines", al.engines, f"one of {', '.join(ENGINES)}")
    whole("alma.k", 1)
    if al.latest_from_round is not None:
        whole("alma.latest_from_round", 1)
    generators = len(SFT) + (al.latest_from_round is not None)
    whole("alma.n", max(generators, 2))  # 1:1:1 needs a response from each checkpoint; pairs need two
    whole("alma.clusters", int(number(cfg, "alma.k")))  # K distinct clusters a round
    whole("alma.kmeans.iterations", 1)
    seeds = to_plain(al.sft_seeds)
    check(isinstance(seeds, list) and len(seeds) == 2 and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
          and seeds[0] != seeds[1], "alma.sft_seeds", seeds, "two different whole numbers (the seeds of M1(1) and M1(2))")
    for key in ("alma.sft_seed", "alma.judge.seed_ratings"):
        path = OmegaConf.select(cfg, key)
        check(path is None or Path(str(path)).expanduser().is_file(), key, path,
              "no such file (null: the seed shipped in the package)")
    pr = al.prompts
    whole("alma.prompts.num_prompts", 0)
    whole("alma.prompts.oversample", 1)
    whole("alma.prompts.shots_generated", 0)
    shots = to_plain(pr.shots_seed)
    check(isinstance(shots, list) and len(shots) == 2 and all(isinstance(s, int) for s in shots) and 1 <= shots[0] <= shots[1],
          "alma.prompts.shots_seed", shots, "[lo, hi] with 1 <= lo <= hi (the paper: [3, 5])")
    check(number(cfg, "alma.prompts.num_prompts") > 0 or bool(pr.seed_in_pool), "alma.prompts.num_prompts", pr.num_prompts,
          "> 0, or alma.prompts.seed_in_pool=true: the pool would be empty")
    fraction("alma.prompts.rouge_l_max")
    whole("alma.prompts.max_tokens", 1)
    check(number(cfg, "alma.prompts.temperature") >= 0, "alma.prompts.temperature", pr.temperature, ">= 0")
    check(0 < number(cfg, "alma.prompts.top_p") <= 1, "alma.prompts.top_p", pr.top_p, "in (0, 1]")
    whole("alma.embed.batch_size", 1)
    whole("alma.embed.max_length", 1)
    jd = al.judge
    check(0 < number(cfg, "alma.judge.heldout_fraction") < 1, "alma.judge.heldout_fraction", jd.heldout_fraction, "in (0, 1)")
    if jd.distill.size is not None:
        whole("alma.judge.distill.size", 1)
    check(isinstance(jd.refresh, bool), "alma.judge.refresh", jd.refresh, "true or false")
    fraction("alma.judge.max_unscored_rate")
    for key in ("alma.sft", "alma.judge.train", "alma.judge.distill.train"):
        unknown = set(OmegaConf.select(cfg, key)) - set(cfg.train)
        check(not unknown, key, to_plain(OmegaConf.select(cfg, key)), f"keys of the train section only (not {sorted(unknown)})")
    if str(cfg.judge.model) != "policy" or cfg.judge.endpoint.base_url:
        raise ConfigError("judge.model / judge.endpoint.base_url: ALMA trains its own judge (alma.judge.*); leave the "
                          "Self-Rewarding judge at judge.model=policy")
    if al.train == "sft" and plugins.chosen(cfg, "filter"):
        raise ConfigError("filters=[...]: pair filters act on preference pairs; alma.train=sft trains on best-of-N "
                          "demonstrations (use alma.train=dpo, or filters=[])")


def roles(cfg: DictConfig) -> list[Role]:
    """The policy's engine (also M_{t-1}'s and, with alma.engines=swap, every checkpoint's), the
    trainer, a role per initial SFT checkpoint, the judge, the embedder; eval and plug-in roles."""
    validate(cfg)
    shared = "policy" if cfg.alma.engines == "swap" else None
    engine = to_plain(cfg.generation.engine)
    resumable = ("alma.engines",)
    # with engines of their own, they make room for the trainer as the policy's does (a shared GPU)
    own = {"engine_of": shared, "bundle": None if shared else "generation", "resumable": resumable,
           "release": "none" if shared else str(cfg.generation.release_for_training)}
    generators = [vllm_role(name, "generation", cfg, engine=engine, resources=cfg.generation.resources, **own) for name in SFT]
    judge = vllm_role(JUDGE, "alma.judge", cfg, engine={**engine, **to_plain(cfg.alma.judge.engine)},
                      resources=cfg.alma.judge.resources, **{**own, "bundle": None if shared else "judge"})
    embedder = Role(EMBEDDER, "task", "alma.embed", to_plain(cfg.alma.embed.resources),
                    resumable=("alma.embed.resources", "alma.embed.threads", "alma.embed.batch_size"))
    return core_roles(cfg) + generators + [judge, embedder] + evaluation.roles(cfg) + plugins.roles(cfg)


def split(n: int, parts: int) -> list[int]:
    """``n`` responses split as evenly as possible among ``parts`` checkpoints (earlier ones get the remainder)."""
    return [n // parts + (i < n % parts) for i in range(parts)]


# -- round 1's pool, clusters and checkpoints ----------------------------------------------------------------
def prompt_pool(
    rnd: Round, seed_pool: list[Prompt], shots: list[str], existing: list[str]
) -> tuple[list[Prompt], list[clusters.Assignment]]:
    """The pool and its clusters: built in round 1 (M0 writes prompts few-shot from ``shots``, deduplicated
    against ``existing`` and each other; M0's hidden states, k-means), read from round 1 after."""
    ctl, al = rnd.ctl, to_plain(rnd.ctl.cfg.alma)
    first = ctl.store.round(1)
    if rnd.index > 1:
        if not (first.has("prompt_pool") and first.has("prompt_clusters")):
            raise OrchestratorError(f"round {rnd.index}: round 1 has no prompt pool and clusters in {first.path}")
        return first.read("prompt_pool", Prompt), first.read("prompt_clusters", clusters.Assignment)
    m0 = ctl.model_path(0)

    def synthesize() -> tuple[list[Prompt], dict[str, float]]:
        new, metrics = stages.self_instruct(call, ctl.workers.serve("policy", m0), shots, [], existing, al["prompts"],
                                            ctl.rng(1, "prompt_pool"), 1)
        pool = (list(seed_pool) if al["prompts"]["seed_in_pool"] else []) + new
        return pool, {**metrics, "alma/pool_size": float(len(pool)), "alma/pool_synthetic": float(len(new))}

    pool = rnd.stage("prompt_pool", Prompt, synthesize)

    def cluster() -> tuple[list[clusters.Assignment], dict[str, float]]:
        from workers.embedder import EmbedWorker

        if len(pool) < int(al["clusters"]):
            raise OrchestratorError(f"alma.clusters={al['clusters']} is more than the prompt pool's {len(pool)} prompts; "
                                    "lower it, or raise alma.prompts.num_prompts")
        vectors = ctl.workers.run(EMBEDDER, EmbedWorker, "embed", [p.text for p in pool], m0, al["embed"])
        return clusters.assign([p.id for p in pool], vectors, int(al["clusters"]), int(ctl.cfg.seed),
                               int(al["kmeans"]["iterations"]))

    return pool, rnd.stage("prompt_clusters", clusters.Assignment, cluster)


def checkpoint_of(ctl: Controller, index: int, name: str) -> tuple[str, str]:
    """(path, sha256) of round ``index``'s checkpoint ``name``."""
    found = ctl.store.round_state(index).get("checkpoints", {}).get(name)
    if not found:
        raise OrchestratorError(f"round {index} has no {name!r} checkpoint (see its manifest entry)")
    return found["path"], found["sha256"]


def initial_sft(rnd: Round, d1: list[Demonstration]) -> dict[str, str]:
    """M1(1) and M1(2): SFT of M0 on D1 with two seeds, checkpoints of round 1 (read from it after)."""
    ctl, al = rnd.ctl, to_plain(rnd.ctl.cfg.alma)
    if rnd.index > 1:
        return {name: checkpoint_of(ctl, 1, name)[0] for name in SFT}
    return {
        name: train_sft(rnd, d1, base=ctl.model_path(0), name=name, stage=name, overrides=al["sft"],
                        seed=int(ctl.cfg.seed) + int(s), prefix=f"{name}/")
        for name, s in zip(SFT, al["sft_seeds"])
    }


# -- the judge ----------------------------------------------------------------------------------------------
def judge_accuracy(rnd: Round, when: str, judge: str, heldout: list[Demonstration]) -> None:
    """Stage ``judge_accuracy_<when>``: the judge at ``judge`` rates the held-out seed responses;
    metrics ``alma/judge_<when>/...`` (pair accuracy, its whole-number variant, MAE)."""
    ctl = rnd.ctl
    prefix = f"alma/judge_{when}/"

    def measure() -> tuple[list[Judgment], dict[str, float]]:
        judgments, metrics = rating.rate(call, ctl.workers.serve(JUDGE, judge), rating.as_generations(heldout), 1.0, prefix)
        return judgments, {**metrics, **rating.accuracy(heldout, judgments, prefix)}

    rnd.stage(f"judge_accuracy_{when}", Judgment, measure)


def self_distilled_judge(
    rnd: Round, seed_train: list[Demonstration], heldout: list[Demonstration], gens: list[Generation]
) -> str:
    """The round's judge checkpoint: in round 1 (every round with alma.judge.refresh) J0 (the seed
    judge, or the last round's judge) rates a sample of the round's responses and is trained further
    on its own ratings; otherwise the judge of the latest round that built one."""
    ctl, jd, t = rnd.ctl, to_plain(rnd.ctl.cfg.alma.judge), rnd.index
    if t > 1:
        earlier = next((i for i in range(t - 1, 0, -1) if "judge" in ctl.store.round_state(i).get("checkpoints", {})), 1)
        before = checkpoint_of(ctl, earlier, "judge")[0]
        if not jd["refresh"]:
            return before
    else:
        before = train_sft(rnd, rating.training_examples(seed_train, "seed"), base=ctl.model_path(0), name="judge_seed",
                           stage="judge_seed", overrides=jd["train"], prefix="judge_seed/")
    judge_accuracy(rnd, "before", before, heldout)
    size = jd["distill"]["size"]
    sample = gens if size is None or size >= len(gens) else ctl.rng(t, "distill").sample(gens, int(size))
    rated = rnd.stage("distill_ratings", Judgment, lambda: rating.rate(
        call, ctl.workers.serve(JUDGE, before), sample, float(jd["max_unscored_rate"]), "alma/distill/"))
    by_key = {(g.prompt_id, g.index): g for g in sample}
    examples = [rating.judge_example(f"{j.prompt_id}/{j.index}", by_key[j.prompt_id, j.index].messages,
                                     by_key[j.prompt_id, j.index].text, j.score, "distill")
                for j in rated if j.score is not None]
    after = train_sft(rnd, examples, base=before, name="judge", stage="judge", overrides=jd["distill"]["train"],
                      prefix="judge_distill/")
    judge_accuracy(rnd, "after", after, heldout)
    return after


# -- responses, best-of-N, training data ----------------------------------------------------------------------
def responses(rnd: Round, generators: dict[str, Any], prompts: list[Prompt]) -> list[Generation]:
    """N responses per prompt, split among ``generators`` (source name -> a function serving it), one
    stage per checkpoint; indices numbered across them, so (prompt, index) is unique."""
    ctl = rnd.ctl
    gen_cfg = to_plain(ctl.cfg.generation)
    out: list[Generation] = []
    first = 0
    for (source, serve), n in zip(generators.items(), split(int(ctl.cfg.alma.n), len(generators))):
        out += rnd.stage(f"generations_{source}", Generation, lambda s=source, f=serve, n=n, i=first: stages.generate_responses(
            call, f(), prompts, {**gen_cfg, "n": n}, source=s, first_index=i, prefix=f"gen/{s}/"))
        first += n
    return out


def score_stats(scores: Sequence[float], prefix: str) -> dict[str, float]:
    if not scores:
        return {}
    q = statistics.quantiles(scores, n=10, method="inclusive") if len(scores) > 1 else [scores[0]] * 9
    return {f"{prefix}mean": statistics.fmean(scores), f"{prefix}std": statistics.pstdev(scores), f"{prefix}min": min(scores),
            f"{prefix}p10": q[0], f"{prefix}p50": q[4], f"{prefix}p90": q[8], f"{prefix}max": max(scores)}


def plot_scores(kept: Sequence[float], everything: Sequence[float], out: Path, title: str) -> Path:
    """A PNG histogram of the best-of-N responses' scores over all responses' scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from orchestrator.eval.plot import save_png

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = [b / 2 for b in range(21)]
    ax.hist(everything, bins=bins, alpha=0.5, label=f"all responses (n={len(everything)})")
    ax.hist(kept, bins=bins, alpha=0.7, label=f"best-of-N, kept (n={len(kept)})")
    ax.set(xlabel="judge score (0-10)", ylabel="responses", title=title)
    ax.legend(fontsize=8)
    return save_png(fig, out)


def select_best(
    rnd: Round, gens: list[Generation], judgments: list[Judgment], sources: list[str]
) -> tuple[list[Demonstration], dict[str, float]]:
    """The best_of_n stage: D_t, each checkpoint's share of the winners, the score distributions (and their PNG)."""
    best, dropped = best_of_n(gens, judgments)
    scores = [j.score for j in judgments if j.score is not None]
    kept = [d.score for d in best]
    metrics = {"alma/best_of_n": float(len(best)), **{f"alma/dropped_{k}": float(v) for k, v in dropped.items()},
               **score_stats(kept, "alma/kept_score_"), **score_stats(scores, "alma/all_score_")}
    for source in sources:
        metrics[f"alma/winner_share/{source}"] = sum(d.source == source for d in best) / len(best) if best else 0.0
    if best:
        png = plot_scores(kept, scores, rnd.dir.path / SCORES_PNG, f"round {rnd.index}: judge scores")
        rnd.ctl.tracker.log_round_artifact(rnd.index, png, "alma")
    return best, metrics


def training_data(rnd: Round, d1: list[Demonstration]) -> list[Demonstration]:
    """D1 u D_1 u ... u D_t: the seed and every round's best-of-N so far."""
    store = rnd.ctl.store
    return list(d1) + [d for i in range(1, rnd.index + 1) for d in store.round(i).read("best_of_n", Demonstration)]


# -- the algorithm --------------------------------------------------------------------------------------------
def run(ctl: Controller) -> None:
    cfg = ctl.cfg
    al = to_plain(cfg.alma)
    d1 = load_demonstrations(al["sft_seed"] or alma_sft_seed_path(), what="alma.sft_seed")
    rated = load_demonstrations(al["judge"]["seed_ratings"] or alma_seed_ratings_path(), what="alma.judge.seed_ratings",
                                rated=True)
    seed_pool = rounds.prompt_pool(ctl)  # data.prompts, refused if it holds held-out eval prompts
    seed_prompts = [chat.last_user(d.messages) for d in d1 + rated]
    evaluation.preflight(cfg, [*seed_pool, *seed_prompts])  # the human seed never holds held-out prompts either
    try:
        seed_train, heldout = rating.split_by_prompt(rated, float(al["judge"]["heldout_fraction"]), ctl.rng(0, "judge_heldout"))
    except ValueError as exc:
        raise ConfigError(f"alma.judge.seed_ratings: {exc}") from None
    shots = [p.text for p in seed_pool] + [chat.last_user(d.messages) for d in d1]  # the seed prompts few-shot draws from
    existing = shots + seed_prompts + held_out_texts(cfg)  # what a new prompt must not repeat
    m0 = ctl.model_path(0)

    for t in ctl.pending_rounds():
        with ctl.round(t) as rnd:
            latest = al["latest_from_round"] is not None and t >= int(al["latest_from_round"])
            scale = {"N": int(al["n"]), "K": int(al["k"]), "R": int(cfg.rounds), "train": al["train"],
                     "generators": [*SFT, *([LATEST] if latest else [])]}
            ctl.store.update_round(t, alma=scale)  # the round manifest records N, K and R

            # prompts: K clusters, one never-used prompt each (pool and clusters built in round 1)
            pool, assignment = prompt_pool(rnd, seed_pool, shots, existing)
            used = {p.id for p in ctl.used_prompts(before=t)[0]}
            prompts = rnd.stage("prompts", Prompt, lambda: with_scale(clusters.pick(
                pool, assignment, used, int(al["k"]), ctl.rng(t, "clusters")), scale))
            if not prompts:
                raise OrchestratorError(f"round {t}: the prompt pool is used up ({len(pool)} prompts); "
                                        "raise alma.prompts.num_prompts")

            # responses: N per prompt, 1:1:1 from M1(1), M1(2) and (t >= 2) M_{t-1}
            sft = initial_sft(rnd, d1)
            generators: dict[str, Any] = {
                name: (lambda n=name: ctl.workers.serve(n, sft[n], checkpoint_of(ctl, 1, n)[1])) for name in SFT
            }
            if latest:
                generators[LATEST] = lambda: ctl.policy(t)  # M_{t-1}: the previous round's policy (M0 at t = 1)
            gens = responses(rnd, generators, prompts)

            # the judge: fine-tuned on the seed ratings, self-distilled; real-valued ratings
            judge = self_distilled_judge(rnd, seed_train, heldout, gens)
            judgments = rnd.stage("judgments", Judgment, lambda: rating.rate(
                call, ctl.workers.serve(JUDGE, judge), gens, float(al["judge"]["max_unscored_rate"])))

            # best-of-N -> D_t; M_t from the base on D1 u ... u D_t (or the DPO variant)
            rnd.stage("best_of_n", Demonstration, lambda: select_best(rnd, gens, judgments, list(generators)))
            if al["train"] == "sft":
                train_sft(rnd, training_data(rnd, d1), base=m0, overrides=al["sft"])
            else:
                pairs = rnd.stage("pairs", Pair, lambda: dpo_pairs(gens, judgments, ctl.rng(t, "pairs")))
                train_dpo(rnd, plugins.filter_pairs(rnd, pairs), base=sft[SFT[0]] if t == 1 else None)
            plugins.apply_transforms(rnd)
            rounds.finish(rnd, gens, artifacts=("best_of_n", "pairs", "train_pairs"))


def with_scale(picked: tuple[list[Prompt], dict[str, float]], scale: dict[str, Any]) -> tuple[list[Prompt], dict[str, float]]:
    """The prompts stage's result, its metrics also holding N, K and R (``alma/N`` ...)."""
    prompts, metrics = picked
    return prompts, {**metrics, **{f"alma/{k}": float(v) for k, v in scale.items() if k in ("N", "K", "R")}}


def dpo_pairs(gens: list[Generation], judgments: list[Judgment], rng: random.Random) -> tuple[list[Pair], dict[str, float]]:
    """The DPO variant's pairs stage: per prompt, best vs a random lower-scored response."""
    pairs, dropped = best_vs_random(gens, judgments, rng)
    return pairs, pair_metrics(pairs, dropped, len({g.prompt_id for g in gens}))


def held_out_texts(cfg: DictConfig) -> list[str]:
    """The eval's held-out and IF prompts (when eval is on): a synthetic prompt must not repeat one."""
    from orchestrator.eval.generations import load_eval_prompts, load_if_items
    from orchestrator.section import Section

    ev = Section("eval", to_plain(cfg.eval))
    if int(ev["every"]) <= 0:
        return []
    return [p.text for p in load_eval_prompts(ev)] + [it["prompt"] for it in load_if_items(ev)]
