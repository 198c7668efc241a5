"""The bench suite: our stages against the plain loops most reimplementations use, side by side in one
run, each stage's achieved FLOP/s against this machine's measured matmul peak, and the
orchestrator's overhead in a finished run.

    python -m bench                      # the default model (SmolLM2-135M-Instruct), sizes of a real round
    python -m bench --quick              # a smoke: few short prompts, a few pairs (add --model DIR for a tiny one)
    python -m bench --run-dir RUN        # overhead from that finished run (default: the newest under outputs/)
    python -m bench --out bench.json --only peak generation judging dpo overhead

Five ratios, printed and written as JSON (``ratios``):
1. ``generation_speedup``: generated tokens/s of our VLLMWorker over an HF ``generate`` loop (batched,
   left-padded, KV cache on) on the same chat-encoded prompts, N samples each, T, top_p, max_tokens.
2. ``judging_speedup``: responses/s of our judge stage (``VLLMWorker.score``, score_only, the rubric
   prefix cached by vLLM) over one HF forward per response (batch 1, no prefix cache) reading the same
   score-token probabilities from the same token ids.
3. ``dpo_speedup``: pairs/s of our TrainerWorker over a plain TRL ``DPOTrainer`` script (reference model
   copy, log-probs computed on the fly: the TRL defaults) on the same pairs, batch sizes, max_length.
4. ``flops_share``: per stage and side, achieved FLOP/s over the measured matmul peak of the stage's
   dtype (torch fp32 and bf16 GEMMs, measured in the same run). FLOPs are counted as 2 x (matmul
   parameters) per token processed (prefill and decode alike), 6x for a trained token and 2x for a
   reference forward; attention's own FLOPs are left out (short sequences here), so shares are lower
   bounds.
5. ``overhead_share``: per finished round of a run, (round wall - raw compute) / round wall, where raw
   compute is the time inside the workers: generation's sampling time (tokens / tokens_per_s), DPO's
   ``train/train_s``, the eval's generate and judge time (the first round also runs the starting
   model's eval, filed under round 0), and the prompts and judgments stages (whose wall is one worker
   call each). What is left is engine starts, weight syncs, checkpoint saves and
   hashing, Ray and MLflow.

Run it on an otherwise idle machine; it starts one vLLM engine and loads the model three more times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent

QUICK = dict(prompts=4, n=2, max_tokens=16, hf_batch=4, pairs=4, train_batch=2, max_length=256, peak_n=256, peak_s=0.3)
FULL = dict(prompts=64, n=4, max_tokens=192, hf_batch=16, pairs=32, train_batch=16, max_length=1024, peak_n=1024, peak_s=3.0)


# -- helpers ----------------------------------------------------------------------------------
def default_model() -> str:
    """The default model as ``orchestrate`` resolves it (conf/model/smollm2_135m.yaml)."""
    from orchestrator.models import resolve_model_path

    return resolve_model_path(project_config().model)


def project_config() -> Any:
    from orchestrator.submit import compose_config

    return compose_config([])


def matmul_params(model_dir: str) -> int:
    """Parameters that take part in a matmul per token: all but an untied input embedding (a lookup)."""
    from safetensors import safe_open
    from transformers import AutoConfig

    total, embed = 0, 0
    for file in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(file), "pt") as fh:
            for name in fh.keys():
                n = 1
                for d in fh.get_slice(name).get_shape():
                    n *= d
                total += n
                if name.endswith("embed_tokens.weight"):
                    embed = n
    tied = bool(getattr(AutoConfig.from_pretrained(model_dir), "tie_word_embeddings", False))
    return total if tied else total - embed


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def measure_peak(n: int, seconds: float) -> dict[str, float]:
    """Matmul FLOP/s of an n x n GEMM in fp32 and bf16 on this machine's torch threads (best of a timed loop)."""
    import torch

    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)  # warm-up: thread pool and kernels
        best, t_end = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < t_end or best == 0.0:
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
        out[name] = best
    return out


def share(flops: float, seconds: float, peak: float) -> float:
    return flops / seconds / peak if seconds > 0 and peak > 0 else 0.0


def prompt_messages(k: int) -> list[Any]:
    from orchestrator.data import load_prompts

    return [p.messages for p in load_prompts(None)[:k]]


# -- 1. generation ----------------------------------------------------------------------------
def hf_generate(model: Any, tokenizer: Any, ids: list[list[int]], n: int, max_tokens: int, temperature: float,
                top_p: float, batch: int) -> tuple[list[list[int]], float]:
    """The HF loop: batches of left-padded prompts, ``num_return_sequences=n``; (generated ids per sample, seconds)."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    samples: list[list[int]] = []
    t0 = time.perf_counter()
    for i in range(0, len(ids), batch):
        chunk = ids[i : i + batch]
        width = max(len(x) for x in chunk)
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk])
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=temperature, top_p=top_p,
                                 max_new_tokens=max_tokens, num_return_sequences=n, pad_token_id=pad)
        for row in out[:, width:].tolist():
            eos = tokenizer.eos_token_id
            samples.append(row[: row.index(eos) + 1] if eos in row else row)
    return samples, time.perf_counter() - t0


def bench_generation(worker: Any, hf: Any, tokenizer: Any, messages: list[Any], size: dict[str, Any], gen_cfg: Any,
                     params: int, peak: float) -> tuple[dict[str, Any], list[Any]]:
    from orchestrator import chat
    from orchestrator.types import GenerationRequest

    temperature, top_p = float(gen_cfg.temperature), float(gen_cfg.top_p)
    request = GenerationRequest(prompts=messages, n=size["n"], temperature=temperature, top_p=top_p, max_tokens=size["max_tokens"])
    completions, ours_s = timed(worker.generate, request)
    ids = [chat.encode(tokenizer, m) for m in messages]
    prompt_tokens = sum(len(x) for x in ids)
    ours_tokens = sum(sum(c.num_tokens) for c in completions)
    samples, hf_s = hf_generate(hf, tokenizer, ids, size["n"], size["max_tokens"], temperature, top_p, size["hf_batch"])
    hf_tokens = sum(len(s) for s in samples)
    # Prefill once per prompt for vLLM (its n samples share it); the HF loop prefills every returned sequence.
    ours_flops = 2 * params * (prompt_tokens + ours_tokens)
    hf_flops = 2 * params * (prompt_tokens * size["n"] + hf_tokens)
    result = {
        "prompts": len(messages), "n": size["n"], "max_tokens": size["max_tokens"], "hf_batch": size["hf_batch"],
        "ours_s": ours_s, "ours_tokens": ours_tokens, "ours_tokens_per_s": ours_tokens / ours_s,
        "hf_s": hf_s, "hf_tokens": hf_tokens, "hf_tokens_per_s": hf_tokens / hf_s,
        "speedup": (ours_tokens / ours_s) / (hf_tokens / hf_s) if hf_tokens and ours_s > 0 else 0.0,
        "flops_share_ours": share(ours_flops, ours_s, peak), "flops_share_hf": share(hf_flops, hf_s, peak),
    }
    return result, completions


# -- 2. judging -------------------------------------------------------------------------------
def naive_judge(hf: Any, tokenizer: Any, prompts: list[str], choices: list[str], prefix: str) -> tuple[list[float | None], int, float]:
    """One HF forward per judge prompt (batch 1, nothing cached): the expected score over the digit
    tokens, with a space token first where the tokenizer writes one (the prompt plus that token in
    one forward gives both positions' distributions). (scores, tokens processed, seconds)."""
    import torch

    from orchestrator import chat, judging

    digit = {c: tokenizer.encode(c, add_special_tokens=False) for c in choices}
    spaced = {c: tokenizer.encode(" " + c, add_special_tokens=False) for c in choices}
    space = tokenizer.encode(" ", add_special_tokens=False)
    space_id = space[0] if len(space) == 1 else None
    scores, tokens = [], 0
    t0 = time.perf_counter()
    for text in prompts:
        ids = chat.encode(tokenizer, chat.user(text), assistant_prefix=prefix)
        full = ids + ([space_id] if space_id is not None else [])
        tokens += len(full)
        with torch.no_grad():
            logits = hf(torch.tensor([full])).logits[0]
        first = torch.softmax(logits[len(ids) - 1].float(), -1)
        after_space = torch.softmax(logits[-1].float(), -1) if space_id is not None else None
        probs = {}
        for c in choices:
            p = float(first[digit[c][0]]) if len(digit[c]) == 1 else 0.0
            if len(spaced[c]) == 1 and spaced[c][0] != digit[c][0]:
                p += float(first[spaced[c][0]])
            if after_space is not None and len(digit[c]) == 1:
                p += float(first[space_id]) * float(after_space[digit[c][0]])
            probs[c] = p
        scores.append(judging.expected_score(probs))
    return scores, tokens, time.perf_counter() - t0


def bench_judging(worker: Any, hf: Any, tokenizer: Any, gens: list[Any], judge_cfg: dict[str, Any], params: int,
                  peak: float) -> tuple[dict[str, Any], list[Any]]:
    from orchestrator import judging

    cfg = {**judge_cfg, "mode": "score_only"}
    worker.prefix_cache()  # restarts the counts: the next read is the judging alone
    judgments, ours_s = timed(worker.score, gens, cfg)
    hit_rate = worker.prefix_cache()["hit_rate"]
    fits = lambda prompt: worker.fits(prompt, judging.SCORE_PREFIX, 2)  # noqa: E731 - the same cut the stage makes
    prompts = [judging.fitted_prompt(g.messages, g.text, fits) for g in gens]
    choices = judging.score_choices(judge_cfg["min_score"], judge_cfg["max_score"])
    naive, tokens, naive_s = naive_judge(hf, tokenizer, prompts, choices, judging.SCORE_PREFIX)
    diffs = [abs(a.score - b) for a, b in zip(judgments, naive) if a.score is not None and b is not None]
    flops = 2 * params * tokens  # the same tokens for both: vLLM reuses the cached rubric prefix instead of computing it
    return {
        "responses": len(gens), "judge_prompt_tokens": tokens, "prefix_cache_hit_rate": hit_rate,
        "ours_s": ours_s, "ours_per_s": len(gens) / ours_s, "naive_s": naive_s, "naive_per_s": len(gens) / naive_s,
        "speedup": naive_s / ours_s if ours_s > 0 else 0.0,
        "score_abs_diff_mean": statistics.fmean(diffs) if diffs else None,
        "flops_share_ours": share(flops, ours_s, peak), "flops_share_naive": share(flops, naive_s, peak),
    }, judgments


# -- 3. DPO -----------------------------------------------------------------------------------
def bench_pairs(gens: list[Any], judgments: list[Any], k: int) -> list[dict[str, Any]]:
    """The round's pairs (best vs worst judged score per prompt), ties broken by sample index so that a
    tiny model's flat judge still gives pairs, repeated to ``k``."""
    from orchestrator.pairs import best_vs_worst
    from orchestrator.types import Judgment

    score = {(j.prompt_id, j.index): j.score or 0.0 for j in judgments}
    js = [Judgment(prompt_id=g.prompt_id, index=g.index, score=score.get((g.prompt_id, g.index), 0.0) + 1e-6 * g.index, samples=[])
          for g in gens]
    pairs = [p.to_dict() for p in best_vs_worst(gens, js)[0]]
    if not pairs:
        raise SystemExit("bench: no pairs could be made from the generations (every prompt had one sample?)")
    return (pairs * (k // len(pairs) + 1))[:k]


def plain_trl_dpo(model_dir: str, pairs: list[dict[str, Any]], train: dict[str, Any], out: str) -> tuple[float, int]:
    """The plain TRL script: DPOTrainer with its defaults (a reference copy, log-probs on the fly); (train seconds, steps)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from workers.trainer import use_bf16

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    data = Dataset.from_list([{"prompt": p["messages"], "chosen": [{"role": "assistant", "content": p["chosen"]}],
                               "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs])
    args = DPOConfig(output_dir=out, beta=float(train["beta"]), learning_rate=float(train["learning_rate"]),
                     per_device_train_batch_size=int(train["micro_batch_size"]),
                     gradient_accumulation_steps=int(train["batch_size"]) // int(train["micro_batch_size"]),
                     num_train_epochs=1, max_length=int(train["max_length"]), bf16=use_bf16(train["bf16"]),
                     logging_steps=1, save_strategy="no", report_to="none", seed=0, use_cpu=not torch.cuda.is_available())
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    _, seconds = timed(trainer.train)
    return seconds, int(trainer.state.global_step)


def pair_tokens(tokenizer: Any, pairs: list[dict[str, Any]], max_length: int) -> int:
    from orchestrator import chat

    total = 0
    for p in pairs:
        for side in ("chosen", "rejected"):
            prompt, completion = chat.encode_pair(tokenizer, chat.as_messages(p["messages"]), p[side])
            total += min(len(prompt) + len(completion), max_length)
    return total


def bench_dpo(model_dir: str, tokenizer: Any, pairs: list[dict[str, Any]], train: dict[str, Any], params: int,
              peaks: dict[str, float]) -> dict[str, Any]:
    from workers.trainer import TrainerWorker, use_bf16

    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        result, ours_wall = timed(TrainerWorker(train.get("threads")).train, pairs, model_dir, f"{tmp}/ours", train, 0)
        ours_s = float(result["metrics"]["train/train_s"])
        plain_s, plain_steps = plain_trl_dpo(model_dir, pairs, train, f"{tmp}/plain")
    tokens = pair_tokens(tokenizer, pairs, int(train["max_length"]))
    bf16 = use_bf16(train["bf16"])
    peak = peaks["bfloat16" if bf16 else "float32"]
    # Both compute the same: a trained forward+backward (6 x params per token) and one reference forward (2x).
    flops = 8 * params * tokens
    return {
        "pairs": len(pairs), "batch_size": int(train["batch_size"]), "micro_batch_size": int(train["micro_batch_size"]),
        "ours_s": ours_s, "ours_worker_wall_s": ours_wall, "ours_steps": int(result["steps"]), "ours_pairs_per_s": len(pairs) / ours_s,
        "plain_trl_s": plain_s, "plain_trl_steps": plain_steps, "plain_trl_pairs_per_s": len(pairs) / plain_s,
        "speedup": plain_s / ours_s if ours_s > 0 else 0.0, "bf16": bf16,
        "flops_share_ours": share(flops, ours_s, peak), "flops_share_plain_trl": share(flops, plain_s, peak),
    }


# -- handoffs (what a round pays between stages; docs/scaling.md) --------------------------------
def handoffs(worker: Any, model_dir: str) -> dict[str, float]:
    """Engine-side costs of a new round's policy: checksum the checkpoint, load it into the running
    engine in place (bench/weight_sync.py measures the release routes too), and write one."""
    import torch
    from transformers import AutoModelForCausalLM

    from bench.weight_sync import perturbed_copy
    from orchestrator.models import checkpoint_fingerprint

    with tempfile.TemporaryDirectory(prefix="bench-sync-") as tmp:
        other = perturbed_copy(model_dir, f"{tmp}/other")
        sha, sha_s = timed(checkpoint_fingerprint, other)
        sync_s = float(worker.sync_weights(other, sha))
        model = AutoModelForCausalLM.from_pretrained(other, dtype=torch.float32)
        _, save_s = timed(model.save_pretrained, f"{tmp}/saved")
    return {"checkpoint_sha256_s": sha_s, "weight_sync_in_place_s": sync_s, "checkpoint_write_s": save_s}


# -- 5. overhead ------------------------------------------------------------------------------
def latest_run(root: Path = ROOT / "outputs") -> Path | None:
    runs = [m.parent for m in root.glob("*/*/manifest.json")] if root.is_dir() else []
    finished = [r for r in runs if any(s.get("status") == "done" for s in _rounds(r).values())]
    return max(finished, key=lambda r: (r / "manifest.json").stat().st_mtime) if finished else None


def _rounds(run: Path) -> dict[str, Any]:
    try:
        return {k: v for k, v in json.loads((run / "manifest.json").read_text()).get("rounds", {}).items() if k != "0"}
    except (OSError, ValueError):
        return {}


def raw_compute(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """Seconds inside the workers per stage, from a round's ``<stage>.metrics.json`` files."""
    out = {}
    gen = metrics.get("generations", {})
    if gen.get("gen/tokens_per_s"):
        out["generations"] = gen["gen/tokens"] / gen["gen/tokens_per_s"]
    elif "time/generations_s" in gen:
        out["generations"] = gen["time/generations_s"]
    for stage in ("prompts", "judgments"):  # one worker call each: their wall is their compute
        if f"time/{stage}_s" in metrics.get(stage, {}):
            out[stage] = metrics[stage][f"time/{stage}_s"]
    train = metrics.get("train", {})
    if "train/train_s" in train:
        out["train"] = train["train/train_s"]
    ev = metrics.get("eval", {})
    if "time/eval_generate_s" in ev or "time/eval_judge_s" in ev:
        out["eval"] = ev.get("time/eval_generate_s", 0.0) + ev.get("time/eval_judge_s", 0.0)
    return out


def overhead(run: Path) -> dict[str, Any]:
    """Per done round of ``run``: wall, raw compute by stage, stage walls, and the overhead share."""
    rounds = []
    start_eval = run / "rounds" / "round_000" / "eval.metrics.json"
    for key, state in sorted(_rounds(run).items(), key=lambda kv: int(kv[0])):
        if state.get("status") != "done" or not state.get("wall_s"):
            continue
        rdir = run / "rounds" / f"round_{int(key):03d}"
        metrics = {f.name.removesuffix(".metrics.json"): json.loads(f.read_text()) for f in rdir.glob("*.metrics.json")}
        compute = raw_compute(metrics)
        if not rounds and start_eval.exists():
            # The starting model's eval runs inside the first round (its wall), filed under round 0.
            compute["eval_start"] = raw_compute({"eval": json.loads(start_eval.read_text())}).get("eval", 0.0)
        stage_wall = {k.removeprefix("time/").removesuffix("_s"): v for m in metrics.values() for k, v in m.items()
                      if k.startswith("time/") and k.endswith("_s") and k.count("/") == 1}
        wall = float(state["wall_s"])
        row = {"round": int(key), "wall_s": wall, "compute_s": compute, "stage_wall_s": stage_wall}
        spare = wall - sum(compute.values())
        if spare < 0:
            # A resumed round's wall time counts only what ran after the resume, its stage files all
            # of it: its overhead cannot be told, and a negative one would pull the mean down.
            rounds.append(row | {"resumed": True, "overhead_s": None, "overhead_share": None})
            continue
        rounds.append(row | {"overhead_s": spare, "overhead_share": spare / wall})
    measured = [r["overhead_share"] for r in rounds if r["overhead_share"] is not None]
    if not measured:
        raise SystemExit(f"bench: {run} has no finished round that ran in one go (manifest.json rounds.N.status=done with wall_s)")
    return {"run_dir": str(run), "rounds": rounds, "overhead_share": statistics.fmean(measured)}


# -- the suite --------------------------------------------------------------------------------
STAGES = ("peak", "generation", "judging", "dpo", "overhead")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.types import Generation
    from workers.vllm_worker import VLLMWorker, resolve_dtype

    size = dict(QUICK if args.quick else FULL)
    size.update({k: v for k, v in vars(args).items() if k in size and v is not None})
    cfg = project_config()
    model = args.model or default_model()
    params = matmul_params(model)
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "processor": platform.processor(), "cuda": torch.cuda.is_available()},
        "model": model, "matmul_params": params, "quick": bool(args.quick), "size": size,
    }
    report["peak_flops"] = measure_peak(size["peak_n"], size["peak_s"])

    wanted = set(args.only or STAGES)
    engine = {**OmegaConf.to_container(cfg.generation.engine, resolve=True), **({"kv_cache_gib": 0.25, "max_model_len": 2048}
                                                                                 if args.quick else {})}
    dtype = resolve_dtype(str(engine.get("dtype", "auto")))
    peak = report["peak_flops"]["bfloat16" if dtype == "bfloat16" else "float32"]
    report["engine"] = {**engine, "resolved_dtype": dtype}
    judge_cfg = OmegaConf.to_container(cfg.judge, resolve=True)
    train = {**OmegaConf.to_container(cfg.train, resolve=True), "batch_size": size["train_batch"],
             "micro_batch_size": min(int(cfg.train.micro_batch_size or size["train_batch"]), size["train_batch"]),
             "max_length": size["max_length"], **({"bf16": args.train_bf16} if args.train_bf16 is not None else {})}

    gens: list[Any] = []
    judgments: list[Any] = []
    if wanted & {"generation", "judging", "dpo"}:
        messages = prompt_messages(size["prompts"])
        tokenizer = AutoTokenizer.from_pretrained(model)
        worker, start_s = timed(VLLMWorker, model, engine, 0)
        report["engine_start_s"] = start_s
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype if dtype != "auto" else "float32")).eval()
        try:
            # DPO trains on the pairs the generations and judgments make, so they run whenever it does.
            report["generation"], completions = bench_generation(worker, hf, tokenizer, messages, size, cfg.generation, params, peak)
            gens = [Generation(prompt_id=f"b{i}", messages=m, index=j, text=t, num_tokens=nt)
                    for i, (m, c) in enumerate(zip(messages, completions)) for j, (t, nt) in enumerate(zip(c.texts, c.num_tokens))]
            if wanted & {"judging", "dpo"}:
                report["judging"], judgments = bench_judging(worker, hf, tokenizer, gens, judge_cfg, params, peak)
            report["handoffs"] = handoffs(worker, model)
        finally:
            worker.shutdown()
            del hf
        if "dpo" in wanted:
            report["dpo"] = bench_dpo(model, tokenizer, bench_pairs(gens, judgments, size["pairs"]), train, params, report["peak_flops"])

    if "overhead" in wanted:
        run_dir = Path(args.run_dir) if args.run_dir else latest_run()
        report["overhead"] = overhead(run_dir) if run_dir else {"error": "no finished run found; pass --run-dir RUN"}

    report["ratios"] = {
        "generation_speedup": report.get("generation", {}).get("speedup"),
        "judging_speedup": report.get("judging", {}).get("speedup"),
        "dpo_speedup": report.get("dpo", {}).get("speedup"),
        "flops_share": {f"{stage}_{side}": report[stage][f"flops_share_{side}"]
                        for stage, sides in (("generation", ("ours", "hf")), ("judging", ("ours", "naive")),
                                             ("dpo", ("ours", "plain_trl")))
                        if stage in report for side in sides},
        "overhead_share": report.get("overhead", {}).get("overhead_share"),
    }
    return report


def summary(report: dict[str, Any]) -> str:
    r = report["ratios"]
    peak = report["peak_flops"]
    lines = [f"model {report['model']} ({report['matmul_params'] / 1e6:.1f}M matmul params), "
             f"peak fp32 {peak['float32'] / 1e9:.1f} GFLOP/s, bf16 {peak['bfloat16'] / 1e9:.1f} GFLOP/s"]
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    if "generation" in report:
        g = report["generation"]
        lines.append(f"(1) generation: ours {g['ours_tokens_per_s']:.1f} tok/s vs HF generate {g['hf_tokens_per_s']:.1f} tok/s "
                     f"-> {fmt(r['generation_speedup'], '.2f')}x")
    if "judging" in report:
        j = report["judging"]
        lines.append(f"(2) judging: ours {j['ours_per_s']:.2f} resp/s vs naive HF forward {j['naive_per_s']:.2f} resp/s "
                     f"-> {fmt(r['judging_speedup'], '.2f')}x (mean |score diff| {fmt(j['score_abs_diff_mean'], '.3f')}; "
                     f"prefix cache served {j['prefix_cache_hit_rate']:.0%} of our prompt tokens)")
    if "dpo" in report:
        d = report["dpo"]
        lines.append(f"(3) DPO: ours {d['ours_pairs_per_s']:.3f} pairs/s vs plain TRL {d['plain_trl_pairs_per_s']:.3f} pairs/s "
                     f"-> {fmt(r['dpo_speedup'], '.2f')}x ({'bf16 autocast' if d['bf16'] else 'fp32'}, both)")
    if "handoffs" in report:
        h = report["handoffs"]
        lines.append(f"handoffs: engine start {report['engine_start_s']:.1f}s, checkpoint write {h['checkpoint_write_s']:.2f}s, "
                     f"sha256 {h['checkpoint_sha256_s']:.2f}s, in-place weight sync {h['weight_sync_in_place_s']:.2f}s")
    lines.append("(4) share of matmul peak: " + ", ".join(f"{k} {v:.1%}" for k, v in r["flops_share"].items()))
    ov = report.get("overhead", {})
    lines.append(f"(5) orchestrator overhead: {fmt(r['overhead_share'], '.1%')} of a round" +
                 (f" ({ov['run_dir']}, {sum(x['overhead_share'] is not None for x in ov['rounds'])} rounds"
                  f"{'; resumed rounds left out' if any(x.get('resumed') for x in ov['rounds']) else ''})"
                  if "rounds" in ov else f" ({ov.get('error', 'skipped')})"))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke: few short prompts and pairs, a short peak measurement")
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the project's default model)")
    ap.add_argument("--run-dir", default=None, help="a finished run for the overhead ratio (default: the newest under outputs/)")
    ap.add_argument("--out", default="bench.json", help="where to write the JSON report")
    ap.add_argument("--only", nargs="+", choices=STAGES, default=None)
    for key in ("prompts", "n", "max_tokens", "hf_batch", "pairs", "train_batch", "max_length"):
        ap.add_argument(f"--{key.replace('_', '-')}", dest=key, type=int, default=None)
    ap.add_argument("--train-bf16", choices=("false", "true", "auto"), default=None,
                    help="train.bf16 for both DPO trainers (default: conf/train/dpo.yaml's; +experiment=self_reward uses auto)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    report = run(args)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(summary(report))
    print(f"written: {args.out}")
