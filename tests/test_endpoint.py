"""The OpenAI-compatible judge against a real ``vllm serve`` on 127.0.0.1 with the tiny model."""

import socket
import subprocess
import sys
import time

import pytest
import requests
from confs import section

from orchestrator import chat, judging
from orchestrator.errors import OrchestratorError
from orchestrator.types import Generation, GenerationRequest
from workers.endpoint import EndpointWorker

pytestmark = pytest.mark.slow

MULTI_TURN = [
    {"role": "system", "content": "Be brief."}, *chat.user("hi"), {"role": "assistant", "content": "hello"}, *chat.user("again"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_checkpoint,
         "--host", "127.0.0.1", "--port", str(port), "--kv-cache-memory-bytes", str(2**28),
         "--max-model-len", "1024", "--seed", "0", "--enforce-eager", "--served-model-name", "tiny"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 420
    while True:
        try:
            if requests.get(f"{base}/models", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        assert proc.poll() is None, "vllm serve exited"
        assert time.time() < deadline, "vllm serve did not come up"
        time.sleep(2)
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def endpoint(**values):
    """conf/judge's ``endpoint`` section with ``values`` over it."""
    return section("judge", endpoint=values)["endpoint"]


def test_endpoint_generate_choice_probs_and_score(server):
    worker = EndpointWorker(endpoint(base_url=server))  # model name discovered from /models
    assert worker.model == "tiny"
    comps = worker.generate(GenerationRequest(prompts=["hello there", MULTI_TURN], n=2, max_tokens=8))
    assert len(comps) == 2 and all(len(c.texts) == 2 for c in comps)

    probs = worker.choice_probs(["rate this", MULTI_TURN], ["0", "1", "2", "3", "4", "5"], assistant_prefix="Score:")
    assert len(probs) == 2
    for p in probs:
        if p is not None:  # a random model may put no digit in its top 20
            assert 0.0 < sum(p.values()) <= 1.0 + 1e-9  # the judge's mass on the digits, not renormalised

    gens = [Generation(prompt_id="p", messages=chat.user("hello"), index=i, text=f"answer {i}", num_tokens=2) for i in range(2)]
    judgments = worker.score(gens, section("judge", mode="text", samples=2, max_tokens=8))
    assert [len(j.samples) for j in judgments] == [2, 2]
    assert all(len(j.raw) == 2 for j in judgments)
    # the random model does not write "Score: N": failures stay None, never 0
    assert all(j.score is None or 0 <= j.score <= 5 for j in judgments)
    assert judging.judgment_metrics(judgments)["judge/responses"] == 2


def test_unreachable_endpoint_is_one_clear_error():
    port = free_port()
    with pytest.raises(OrchestratorError, match="unreachable"):
        EndpointWorker(endpoint(base_url=f"http://127.0.0.1:{port}/v1", model="x", timeout_s=2, max_retries=1, backoff_s=0.1)).generate(
            GenerationRequest(prompts=["hi"])
        )


def test_messages_are_sent_as_they_are(monkeypatch):
    worker = EndpointWorker(endpoint(base_url="http://127.0.0.1:9/v1", model="m"))
    sent = []

    def post(path, body, parse=lambda data: data):
        sent.append((path, body))
        return parse({"choices": [{"index": 0, "message": {"content": "ok"}, "finish_reason": "stop", "logprobs": None}]})

    monkeypatch.setattr(worker, "_post", post)
    worker.generate(GenerationRequest(prompts=[MULTI_TURN]))
    worker.choice_probs([MULTI_TURN], ["1", "2"], assistant_prefix="Score:")
    (gen_path, gen_body), (probs_path, probs_body) = sent
    assert gen_path == probs_path == "/chat/completions"
    assert gen_body["messages"] == MULTI_TURN and "continue_final_message" not in gen_body
    # The assistant prefix is a prefill the server continues.
    assert probs_body["messages"] == [*MULTI_TURN, {"role": "assistant", "content": "Score:"}]
    assert probs_body["continue_final_message"] is True and probs_body["add_generation_prompt"] is False
