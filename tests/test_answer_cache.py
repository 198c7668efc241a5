"""eval.answer_cache: a model's greedy eval answers are kept across runs under a key of the model,
the decoding, the engine and vLLM, and a second run of the same model generates nothing."""

from __future__ import annotations

from confs import section
from test_eval_stage import FakeWorker

from orchestrator.eval.answer_cache import answer_cache
from orchestrator.eval.generations import GENERATIONS_FILE, cached
from orchestrator.eval.stage import eval_stage
from orchestrator.store import RunStore


def start_eval(tmp_path, name, ev, shared, respond=lambda p: f"answer to {p}"):
    """Round 0 of a fresh run: (its metrics, the policy's generate calls, the answers it wrote)."""
    store = RunStore(tmp_path / name)
    policy = FakeWorker(respond=respond)
    _, metrics = eval_stage(round_index=0, policy=policy, fixed_judge=FakeWorker(), store=store, cfg=ev,
                            judge_cfg=section("judge"), shared_answers=shared)  # fmt: skip
    return metrics, len(policy.asked), cached(store.round(0))


def test_a_second_run_of_the_same_model_reuses_every_answer(tmp_path):
    ev = section("eval", answer_cache=str(tmp_path / "shared"), max_prompts=4, if_max_prompts=3)
    engine = {"dtype": "float32"}
    first, asked, answers = start_eval(tmp_path, "run1", ev, answer_cache(ev, "sha-A", engine))
    assert asked == 7 and first["eval/generated"] == 7 and first["eval/answers_reused"] == 0

    # Same model, decoding and engine: nothing generated, the same answers in the new run's own folder.
    second, asked, answers2 = start_eval(tmp_path, "run2", ev, answer_cache(ev, "sha-A", engine), respond=lambda p: "other")
    assert asked == 0 and second["eval/generated"] == 0 and second["eval/answers_reused"] == 7
    assert {k: r.text for k, r in answers2.items()} == {k: r.text for k, r in answers.items()}
    assert (tmp_path / "run2" / "rounds" / "round_000" / GENERATIONS_FILE).is_file()
    assert second["eval/if/prompt_accuracy"] == first["eval/if/prompt_accuracy"]

    # Another model, another decoding or another engine: a different key, answered afresh.
    other_decoding = section("eval", answer_cache=str(tmp_path / "shared"), max_prompts=4, if_max_prompts=3,
                             decoding={"max_tokens": 64})  # fmt: skip
    for i, (cfg, model, eng) in enumerate([(ev, "sha-B", engine), (other_decoding, "sha-A", engine), (ev, "sha-A", {"dtype": "bfloat16"})]):
        metrics, asked, _ = start_eval(tmp_path, f"other{i}", cfg, answer_cache(cfg, model, eng))
        assert asked == 7 and metrics["eval/answers_reused"] == 0, i

    # More prompts than were cached: only the new ones are generated.
    more = section("eval", answer_cache=str(tmp_path / "shared"), max_prompts=6, if_max_prompts=3)
    metrics, asked, _ = start_eval(tmp_path, "more", more, answer_cache(more, "sha-A", engine))
    assert asked == 2 and metrics["eval/answers_reused"] == 7


def test_no_sharing_when_sampling_off_or_unknown(tmp_path):
    ev = section("eval", answer_cache=str(tmp_path / "shared"))
    assert answer_cache(ev, None, {}) is None  # a model without a fingerprint
    assert answer_cache(section("eval", answer_cache=None), "sha", {}) is None
    assert answer_cache(section("eval", answer_cache=str(tmp_path), decoding={"temperature": 0.7}), "sha", {}) is None
    assert answer_cache(ev, "sha", {}) is not None


def test_a_damaged_cache_file_is_regenerated(tmp_path):
    ev = section("eval", answer_cache=str(tmp_path / "shared"), max_prompts=2, if_max_prompts=0)
    shared = answer_cache(ev, "sha-A", {})
    shared.path.parent.mkdir(parents=True)
    shared.path.write_text('{"not": "a response"}\n{broken\n')
    metrics, asked, _ = start_eval(tmp_path, "run", ev, shared)
    assert asked == 2 and metrics["eval/answers_reused"] == 0
    metrics, asked, _ = start_eval(tmp_path, "again", ev, answer_cache(ev, "sha-A", {}))
    assert asked == 0 and metrics["eval/answers_reused"] == 2  # rewritten whole by the first


def test_how_the_engine_runs_is_not_part_of_the_key(tmp_path):
    """Settings that never change what the engine computes (threads, batch size, the sampler
    plug-in, eager mode) keep the answers; dtype and context length do not."""
    from orchestrator.eval.loop import computing

    ev = section("eval", answer_cache=str(tmp_path))
    engine = section("generation")["engine"]
    key = answer_cache(ev, "sha", computing(engine)).path
    for change in ({"fast_top_p": False}, {"max_num_seqs": 8}, {"enforce_eager": False}, {"threads": 1}, {"in_process": False}):
        assert answer_cache(ev, "sha", computing({**engine, **change})).path == key, change
    # an unknown key is not known to be harmless: it is part of the key
    for change in ({"dtype": "float32"}, {"max_model_len": 512}, {"new_runtime_knob": 1}):
        assert answer_cache(ev, "sha", computing({**engine, **change})).path != key, change
