"""Checks on the ``eval`` section (conf/eval/default.yaml), run by ``orchestrator.config.validate``
so that a bad value or a missing file fails at start, before any run directory exists."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from orchestrator.config import check, number
from orchestrator.eval.lc_winrate import PENALTIES, SE_METHODS
from orchestrator.eval.pairwise import MODES
from orchestrator.models import check_checkpoint_dir
from orchestrator.refine import FORMATS, template_problem

AGREEMENT_METHODS = ("pointwise", "pairwise")
# eval.judge.model naming the run's starting model rather than a checkpoint path.
START = "start"


def _count_or_null(cfg: DictConfig, key: str, want: str) -> None:
    value = cfg.eval[key]
    if value is not None:
        n = number(cfg, f"eval.{key}")
        check(n >= 0 and n.is_integer(), f"eval.{key}", value, want)


def validate(cfg: DictConfig) -> None:
    """Every ``eval.*`` value the stage reads is usable; ConfigError naming the key otherwise."""
    ev = cfg.eval
    every = number(cfg, "eval.every")
    check(every >= 0 and every.is_integer(), "eval.every", ev.every, "0 (off) or a whole number of rounds")
    _count_or_null(cfg, "max_prompts", "null (all) or a whole number")
    _count_or_null(cfg, "if_max_prompts", "null (all), 0 (skip) or a whole number")
    for key in ("prompts", "if_prompts"):
        if ev[key] is not None:
            check(Path(str(ev[key])).expanduser().is_file(), f"eval.{key}", ev[key], "no such file")

    check(number(cfg, "eval.decoding.temperature") >= 0, "eval.decoding.temperature", ev.decoding.temperature, ">= 0")
    check(0 < number(cfg, "eval.decoding.top_p") <= 1, "eval.decoding.top_p", ev.decoding.top_p, "in (0, 1]")
    check(number(cfg, "eval.decoding.max_tokens") >= 1, "eval.decoding.max_tokens", ev.decoding.max_tokens, ">= 1")

    steps = number(cfg, "eval.refine_steps")
    check(steps >= 0 and steps.is_integer() and not isinstance(ev.refine_steps, bool), "eval.refine_steps", ev.refine_steps,
          "0 (off) or a whole number of refinement steps")
    check(ev.refine_format in FORMATS, "eval.refine_format", ev.refine_format, f"one of {', '.join(FORMATS)}")
    problem = template_problem(ev.refine_template, str(ev.refine_format))
    check(problem is None, "eval.refine_template", ev.refine_template, str(problem))
    check(isinstance(ev.refine_if, bool), "eval.refine_if", ev.refine_if, "true or false")
    if steps > 0:
        check(2 * number(cfg, "eval.decoding.max_tokens") < number(cfg, "generation.engine.max_model_len"),
              "eval.decoding.max_tokens", ev.decoding.max_tokens,
              "with eval.refine_steps > 0 twice it must stay below generation.engine.max_model_len (an earlier answer, then the new one)")

    pw = ev.pairwise
    check(pw.mode in MODES, "eval.pairwise.mode", pw.mode, f"one of {', '.join(MODES)}")
    choices = list(pw.choices)
    check(len(set(choices)) == 2 and all(isinstance(c, str) and c for c in choices),
           "eval.pairwise.choices", choices, "two different non-empty strings")
    check(number(cfg, "eval.pairwise.max_output_chars") >= 0, "eval.pairwise.max_output_chars", pw.max_output_chars, ">= 0 (0: no clipping)")

    lc = ev.lc
    check(lc.penalty in PENALTIES, "eval.lc.penalty", lc.penalty, f"one of {', '.join(PENALTIES)}")
    check(lc.se in SE_METHODS, "eval.lc.se", lc.se, f"one of {', '.join(SE_METHODS)}")
    check(number(cfg, "eval.lc.C") > 0, "eval.lc.C", lc.C, "> 0")
    check(number(cfg, "eval.lc.bootstrap") >= 0, "eval.lc.bootstrap", lc.bootstrap, ">= 0")

    check(ev.agreement.method in AGREEMENT_METHODS, "eval.agreement.method", ev.agreement.method,
           f"one of {', '.join(AGREEMENT_METHODS)}")

    # A judge behind an endpoint serves its own model; otherwise eval.judge.model is served locally.
    if not ev.judge.endpoint.base_url and str(ev.judge.model) != START:
        check_checkpoint_dir(str(ev.judge.model), what="eval.judge.model")
