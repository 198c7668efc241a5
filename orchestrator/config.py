"""Checks on the composed config, so a bad value fails at start with one line naming the key."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orchestrator.errors import ConfigError
from orchestrator.judging import MODES

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def run_dir_path(run_dir: str, storage_path: str | None = None) -> str:
    """The run dir as an absolute path: a relative one goes under ``storage.path`` (or the cwd)."""
    path = Path(os.path.expanduser(str(run_dir)))
    if not path.is_absolute():
        base = Path(os.path.expanduser(str(storage_path))) if storage_path else Path.cwd()
        path = base / path
    return os.path.normpath(os.path.abspath(path))


def resolve_run_dir(cfg: DictConfig) -> str:
    """The composed config's ``run_dir`` as an absolute path (see ``run_dir_path``)."""
    run_dir = OmegaConf.select(cfg, "run_dir", throw_on_missing=False)
    if not run_dir:
        raise ConfigError("run_dir is empty")
    return run_dir_path(run_dir, OmegaConf.select(cfg, "storage.path", throw_on_missing=False))


# Hydra writes its own logs (hydra.run.dir in conf/config.yaml) before any of our code runs; this
# resolver puts them in the same place the run store uses, under storage.path when that is set.
OmegaConf.register_new_resolver("run_dir_path", run_dir_path, replace=True)


def _check(ok: bool, key: str, value: object, want: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {want}")


def _num(cfg: DictConfig, key: str) -> float:
    value = OmegaConf.select(cfg, key)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is invalid: expected a number") from None


def validate(cfg: DictConfig) -> None:
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        raise ConfigError(f"config key {key or '?'} has no value: {str(exc).splitlines()[0]}") from None

    _check(_num(cfg, "rounds") >= 1 and float(cfg.rounds).is_integer(), "rounds", cfg.rounds, "a whole number >= 1")
    _check(_num(cfg, "generation.n") >= 2, "generation.n", cfg.generation.n, "at least 2 responses per prompt to form pairs")
    _check(_num(cfg, "generation.temperature") >= 0, "generation.temperature", cfg.generation.temperature, ">= 0")
    _check(0 < _num(cfg, "generation.top_p") <= 1, "generation.top_p", cfg.generation.top_p, "in (0, 1]")
    _check(_num(cfg, "generation.max_tokens") >= 1, "generation.max_tokens", cfg.generation.max_tokens, ">= 1")
    _check(_num(cfg, "data.prompts_per_round") >= 0, "data.prompts_per_round", cfg.data.prompts_per_round, ">= 0")
    _check(_num(cfg, "data.self_instruct.num_prompts") >= 0, "data.self_instruct.num_prompts", cfg.data.self_instruct.num_prompts, ">= 0")
    _check(
        _num(cfg, "data.prompts_per_round") + _num(cfg, "data.self_instruct.num_prompts") >= 1,
        "data.prompts_per_round", cfg.data.prompts_per_round, "with data.self_instruct.num_prompts, at least one prompt per round",
    )
    _check(cfg.judge.mode in MODES, "judge.mode", cfg.judge.mode, f"one of {', '.join(MODES)}")
    _check(_num(cfg, "judge.samples") >= 1, "judge.samples", cfg.judge.samples, ">= 1")
    _check(0 <= _num(cfg, "judge.max_parse_failure_rate") <= 1, "judge.max_parse_failure_rate", cfg.judge.max_parse_failure_rate, "in [0, 1]")
    _check(cfg.train.method in ("full", "lora"), "train.method", cfg.train.method, "full or lora")
    _check(cfg.train.loss == "dpo", "train.loss", cfg.train.loss, "dpo (the only loss so far)")
    _check(_num(cfg, "train.beta") > 0, "train.beta", cfg.train.beta, "> 0")
    _check(_num(cfg, "train.learning_rate") > 0, "train.learning_rate", cfg.train.learning_rate, "> 0")
    _check(_num(cfg, "train.epochs") > 0, "train.epochs", cfg.train.epochs, "> 0")
    _check(
        _num(cfg, "train.batch_size") >= 1 and _num(cfg, "train.micro_batch_size") >= 1
        and _num(cfg, "train.batch_size") % _num(cfg, "train.micro_batch_size") == 0,
        "train.batch_size", cfg.train.batch_size, "a multiple of train.micro_batch_size",
    )
    _check(0 < _num(cfg, "generation.engine.gpu_memory_utilization") <= 1,
           "generation.engine.gpu_memory_utilization", cfg.generation.engine.gpu_memory_utilization, "in (0, 1]")
    if cfg.data.prompts is not None:
        _check(Path(str(cfg.data.prompts)).expanduser().is_file(), "data.prompts", cfg.data.prompts, "no such file")
