"""The eval section's checks: they run from ``orchestrator.config.validate``, so a bad value fails
before any run directory exists; every default comes from conf/eval/default.yaml."""

from __future__ import annotations

import pytest
from confs import composed, section

from orchestrator.config import validate
from orchestrator.errors import ConfigError


def test_the_yaml_holds_every_default():
    c = section("eval")
    assert c["every"] == 1 and c["max_prompts"] == 64 and c["judge"]["engine"]["gpu_memory_utilization"] == 0.1
    assert c["lc"]["penalty"] == "l2" and c["pairwise"]["choices"] == ["a", "b"] and c["pairwise"]["template"] is None
    assert c["judge"]["resources"] == {"num_cpus": 0, "num_gpus": 0} and c["agreement"] == {"enabled": True, "method": "pointwise"}


@pytest.mark.parametrize(
    "override, message",
    [
        ("eval.pairwise.mode=bogus", r"eval.pairwise.mode='bogus' is invalid: one of soft, hard"),
        ("eval.pairwise.choices=[a,a]", r"eval.pairwise.choices=\['a', 'a'\] is invalid: two different"),
        ("eval.lc.penalty=l3", r"eval.lc.penalty='l3' is invalid: one of l2, l1, none"),
        ("eval.lc.se=jackknife", r"eval.lc.se='jackknife' is invalid"),
        ("eval.lc.C=0", r"eval.lc.C=0 is invalid: > 0"),
        ("eval.agreement.method=vote", r"eval.agreement.method='vote' is invalid: one of pointwise, pairwise"),
        ("eval.every=-1", r"eval.every=-1 is invalid: 0 \(off\) or a whole number"),
        ("eval.every=1.5", r"eval.every=1.5 is invalid"),
        ("eval.max_prompts=-2", r"eval.max_prompts=-2 is invalid"),
        ("eval.if_max_prompts=-1", r"eval.if_max_prompts=-1 is invalid"),
        ("eval.decoding.top_p=0", r"eval.decoding.top_p=0 is invalid: in \(0, 1\]"),
        ("eval.decoding.max_tokens=0", r"eval.decoding.max_tokens=0 is invalid"),
        ("eval.prompts=/no/such/file.jsonl", r"eval.prompts='/no/such/file.jsonl' is invalid: no such file"),
        ("eval.if_prompts=/no/such/if.jsonl", r"eval.if_prompts='/no/such/if.jsonl' is invalid: no such file"),
        ("eval.judge.model=/no/such/judge", r"eval.judge.model=/no/such/judge: no such directory"),
    ],
)
def test_a_bad_eval_value_fails_before_the_run_exists(tmp_path, override, message):
    from orchestrator.cli import run

    cfg = composed([f"run_dir={tmp_path / 'run'}", override])
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert not (tmp_path / "run").exists()


def test_the_judge_model_is_a_checkpoint_dir_unless_an_endpoint_serves(tmp_path, tiny_checkpoint):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="eval.judge.model=.*empty: no config.json there"):
        validate(composed([f"eval.judge.model={tmp_path / 'empty'}"]))
    validate(composed([f"eval.judge.model={tiny_checkpoint}"]))
    validate(composed(["eval.judge.model=/no/such/judge", "eval.judge.endpoint.base_url=http://localhost:1/v1"]))


def test_the_defaults_and_existing_files_pass(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    validate(composed([]))
    validate(composed([f"eval.prompts={prompts}", "eval.max_prompts=null", "eval.if_max_prompts=0", "eval.every=0"]))
