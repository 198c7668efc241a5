"""``orchestrate-expo``: ExPO on two local checkpoints, once (Zheng et al. 2024; orchestrator/expo.py).

    orchestrate-expo weak=DIR strong=DIR alpha=0.3 out=DIR
    orchestrate-expo weak=DIR strong=DIR alphas=[0.1,0.3,0.5] out=DIR [dev_prompts=FILE]
                     [dev_max_prompts=N] [judge=DIR] [generation.engine.kv_cache_gib=1 ...]

writes theta = theta_strong + alpha * (theta_strong - theta_weak) to ``out`` (a new folder), e.g.
weak = the SFT model and strong = its DPO-aligned version. With ``alpha`` the extrapolation is all
(no vLLM, one tensor at a time). With ``alphas`` alpha is searched as the paper does: each
candidate (alpha = 0, ``strong`` itself, always among them) answers the dev prompts (default: the
shipped set, orchestrator/data/dev_prompts.jsonl) in a local vLLM engine, a judge checkpoint
(``judge=DIR``, default ``weak``) scores the answers with the ``judge`` config (score_only by
default), and the best candidate becomes ``out``. Other ``KEY=VALUE`` arguments override the
run config as for ``orchestrate`` (``generation.engine.*`` for the candidates' engine,
``eval.judge.engine.*`` over it for the judge's, ``judge.*``, ``transform.expo.decoding.*``).
``out/expo.json`` records the inputs, the alpha and the search. Errors a user can fix print as
one ``error:`` line and exit with status 2.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from orchestrator.errors import ConfigError, OrchestratorError

log = logging.getLogger("orchestrator")

OWN = ("weak", "strong", "out", "alpha", "alphas", "dev_prompts", "dev_max_prompts", "judge")
USAGE = "usage: orchestrate-expo weak=DIR strong=DIR out=DIR (alpha=A | alphas=[A,...] [dev_prompts=FILE] [judge=DIR])"


def parse(args: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """``KEY=VALUE`` arguments: this command's own keys, and config overrides (dotted keys)."""
    own: dict[str, str] = {}
    overrides: list[str] = []
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq or not key:
            raise ConfigError(f"argument {arg!r} is not KEY=VALUE; {USAGE}")
        if key in OWN:
            if key in own:
                raise ConfigError(f"{key} is given twice")
            own[key] = value
        elif "." in key.lstrip("+~"):
            overrides.append(arg)
        else:
            raise ConfigError(f"unknown argument {key}= (this command's own: {', '.join(OWN)}; config overrides are dotted keys)")
    missing = [k for k in ("weak", "strong", "out") if k not in own]
    if missing:
        raise ConfigError(f"missing {', '.join(k + '=DIR' for k in missing)}; {USAGE}")
    if ("alpha" in own) == ("alphas" in own):
        raise ConfigError(f"give alpha=A (a fixed alpha) or alphas=[A,...] (a search), not {'both' if 'alpha' in own else 'neither'}")
    return own, overrides


def as_alpha(key: str, value: Any) -> float:
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is invalid: expected a number") from None
    if not alpha >= 0 or alpha == float("inf"):
        raise ConfigError(f"{key}={value!r} is invalid: a number >= 0")
    return alpha


def as_alphas(value: str) -> list[float]:
    try:
        items = yaml.safe_load(value)
    except yaml.YAMLError:
        items = None
    if not isinstance(items, list):
        raise ConfigError(f"alphas={value} is invalid: a list such as alphas=[0.1,0.3,0.5]")
    alphas = [as_alpha("alphas", a) for a in items]
    if not any(a > 0 for a in alphas):
        raise ConfigError(f"alphas={value} is invalid: at least one alpha > 0 (alpha = 0, strong itself, is always scored)")
    return alphas


def run(args: Sequence[str]) -> dict[str, Any]:
    """Check everything, then write ``out``; returns what ``out/expo.json`` records."""
    from orchestrator.expo import check_compatible, extrapolate
    from orchestrator.models import check_checkpoint_dir

    own, overrides = parse(args)
    strong = check_checkpoint_dir(own["strong"], what="strong")
    weak = Path(own["weak"]).expanduser()
    if not weak.is_dir():
        raise ConfigError(f"weak={own['weak']}: no such directory")
    weak = weak.resolve()
    out = Path(own["out"]).expanduser().resolve()
    if out.exists():
        raise ConfigError(f"out={own['out']} exists; choose a new folder")
    check_compatible(weak, strong)  # names, shapes and dtypes, before anything starts

    info: dict[str, Any] = {"weak": str(weak), "strong": str(strong), "out": str(out)}
    if "alpha" in own:
        if overrides:
            raise ConfigError(f"config overrides ({overrides[0]}) only apply to a search (alphas=[...])")
        alpha = as_alpha("alpha", own["alpha"])
        out.parent.mkdir(parents=True, exist_ok=True)
        info.update(alpha=alpha, metrics=extrapolate(weak, strong, alpha, out))
    else:
        info.update(search_alpha(own, overrides, weak, strong, out))
    (out / "expo.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def search_alpha(own: dict[str, str], overrides: list[str], weak: Path, strong: Path, out: Path) -> dict[str, Any]:
    """The paper's alpha search with local vLLM engines: candidates in one, the judge in another."""
    from orchestrator.config import to_plain
    from orchestrator.expo import extrapolate
    from orchestrator.models import check_checkpoint_dir
    from orchestrator.submit import compose_config
    from orchestrator.transforms.expo import best, check_held_out, load_dev_prompts, score_candidate, search

    alphas = as_alphas(own["alphas"])
    judge = check_checkpoint_dir(own.get("judge") or weak, what="judge" if own.get("judge") else "weak (the default judge)")
    try:
        cfg = compose_config(["transforms=[expo]", *overrides])
    except Exception as exc:  # Hydra's errors for an unknown key or a bad value
        raise ConfigError(f"config overrides {' '.join(overrides)}: {str(exc).splitlines()[0]}") from None
    limit = own.get("dev_max_prompts")
    if limit is not None and not (limit.isdigit() and int(limit) >= 1):
        raise ConfigError(f"dev_max_prompts={limit} is invalid: a whole number >= 1")
    dev_file = own.get("dev_prompts")
    dev = load_dev_prompts(dev_file, int(limit) if limit else None, "dev_prompts")
    check_held_out(cfg, dev, "dev_prompts", dev_file or "the shipped dev set")
    decoding = to_plain(cfg.transform.expo.decoding)
    judge_cfg = to_plain(cfg.judge)
    engine = to_plain(cfg.generation.engine)

    from workers.vllm_worker import VLLMWorker

    engines: dict[str, Any] = {}

    def candidate(path: str) -> Any:
        if "policy" not in engines:
            engines["policy"] = VLLMWorker(path, dict(engine), int(cfg.seed))
        engines["policy"].sync_weights(path)
        return engines["policy"]

    def scorer() -> Any:
        if "judge" not in engines:
            engines["judge"] = VLLMWorker(str(judge), {**engine, **to_plain(cfg.eval.judge.engine)}, int(cfg.seed))
        return engines["judge"]

    work = out.parent / f".{out.name}.expo-candidates"  # no resume here: deleted whatever happens
    try:
        try:
            records, kept = search(
                weak, strong, alphas, work,
                lambda alpha, path: score_candidate(alpha, candidate(path), scorer, dev, decoding, judge_cfg),
            )
        finally:
            for e in engines.values():
                e.shutdown()
        chosen = best(records)
        if kept is not None:
            os.replace(kept, out)  # the scored candidate itself
            metrics = dict(chosen.extrapolation)
        else:
            metrics = extrapolate(weak, strong, chosen.alpha, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "alpha": chosen.alpha, "metrics": metrics, "judge": str(judge), "dev_prompts": len(dev),
        "search": [{"alpha": r.alpha, "score": r.score} for r in records],
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if args else 2)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        info = run(args)
    except OrchestratorError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    for row in info.get("search", []):
        score = "-" if row["score"] is None else f"{row['score']:.4f}"
        print(f"alpha {row['alpha']:<6g} dev score {score}{'   <- chosen' if row['alpha'] == info['alpha'] else ''}")
    m = info["metrics"]
    print(f"wrote {info['out']}: alpha={info['alpha']:g}, {int(m['expo/tensors'])} tensors "
          f"({int(m['expo/tensors_changed'])} changed), update |theta_1 - theta_0| / |theta_1| = {m['expo/update_rel_norm']:.3g}")


if __name__ == "__main__":
    main()
