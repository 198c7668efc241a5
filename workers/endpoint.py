"""A judge (or sampler) behind an OpenAI-compatible HTTP endpoint, e.g. ``vllm serve``.

Same coarse methods as ``VLLMWorker`` (``generate``, ``choice_probs``, ``score``), so the
controller and the eval stage use either without knowing which. Plain HTTP through ``requests``;
runs in the driver process, since it holds no model.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from orchestrator import judging
from orchestrator.chat import Messages, as_messages
from orchestrator.errors import OrchestratorError
from orchestrator.types import Completion, Generation, GenerationRequest, Judgment


class EndpointWorker:
    def __init__(self, endpoint: dict[str, Any], concurrency: int = 8):
        self.base_url = str(endpoint["base_url"]).rstrip("/")
        self.timeout = float(endpoint.get("timeout_s", 120))
        key = os.environ.get(str(endpoint.get("api_key_env") or ""), "") if endpoint.get("api_key_env") else ""
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.concurrency = concurrency
        self.model = endpoint.get("model") or self._first_model()

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.base_url}{path}"
        try:
            resp = requests.post(url, json=body, headers=self.headers, timeout=self.timeout)
        except requests.RequestException as exc:
            raise OrchestratorError(f"judge endpoint {url} unreachable: {exc.__class__.__name__}: {exc}") from None
        if resp.status_code != 200:
            raise OrchestratorError(f"judge endpoint {url} answered HTTP {resp.status_code}: {resp.text[:300]}")
        return resp.json()

    def _first_model(self) -> str:
        try:
            resp = requests.get(f"{self.base_url}/models", headers=self.headers, timeout=self.timeout)
            resp.raise_for_status()
            return resp.json()["data"][0]["id"]
        except (requests.RequestException, KeyError, IndexError, ValueError) as exc:
            raise OrchestratorError(
                f"judge.endpoint.model is not set and {self.base_url}/models did not name one ({exc})"
            ) from None

    def _map(self, fn, items):
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(fn, items))

    def _messages(self, prompt: Messages | str, assistant_prefix: str = "") -> tuple[Messages, dict[str, Any]]:
        messages = as_messages(prompt)
        if not assistant_prefix:
            return messages, {}
        # vLLM's server continues a final assistant message, which makes the prefix a real prefill.
        messages.append({"role": "assistant", "content": assistant_prefix})
        return messages, {"continue_final_message": True, "add_generation_prompt": False}

    def generate(self, request: GenerationRequest) -> list[Completion]:
        def one(prompt: Messages | str) -> Completion:
            if request.chat:
                body = {"messages": prompt}
                path = "/chat/completions"
            else:
                body = {"prompt": prompt}
                path = "/completions"
            body.update(
                model=self.model, n=request.n, temperature=request.temperature, top_p=request.top_p,
                max_tokens=request.max_tokens, stop=list(request.stop) or None,
            )
            data = self._post(path, body)
            choices = sorted(data["choices"], key=lambda c: c["index"])
            texts = [c["message"]["content"] if request.chat else c["text"] for c in choices]
            usage = data.get("usage") or {}
            per = int(usage.get("completion_tokens", 0)) // max(len(choices), 1)
            return Completion(texts=texts, num_tokens=[per] * len(texts), finish_reasons=[str(c.get("finish_reason")) for c in choices])

        return self._map(one, request.prompts)

    def choice_probs(
        self, prompts: list[Messages] | list[str], choices: list[str], assistant_prefix: str = "", chat: bool = True
    ) -> list[dict[str, float] | None]:
        def one(prompt: Messages | str) -> dict[str, float] | None:
            messages, extra = self._messages(prompt, assistant_prefix)
            body = {"model": self.model, "messages": messages, "max_tokens": 1, "temperature": 1.0,
                    "logprobs": True, "top_logprobs": 20, **extra}
            data = self._post("/chat/completions", body)
            content = (data["choices"][0].get("logprobs") or {}).get("content") or []
            if not content:
                return None
            mass = {c: 0.0 for c in choices}
            for entry in content[0].get("top_logprobs", []):
                token = entry["token"].strip()
                if token in mass:
                    mass[token] += math.exp(entry["logprob"])
            total = sum(mass.values())
            return {c: m / total for c, m in mass.items()} if total > 0 else None

        return self._map(one, prompts)

    def score(self, generations: list[Generation], judge_cfg: dict[str, Any]) -> list[Judgment]:
        return judging.score_with(self, generations, judge_cfg)

    def sync_weights(self, model_path: str) -> float:
        raise OrchestratorError("an endpoint judge serves a fixed model; it cannot load new weights")

    def shutdown(self) -> None:
        pass
