import json
import os

import pytest

from orchestrator.chat import user
from orchestrator.store import RunStore, publish_dir, read_jsonl, write_jsonl
from orchestrator.types import Generation, Pair, Prompt


def test_jsonl_round_trip_and_atomicity(tmp_path):
    path = tmp_path / "r" / "prompts.jsonl"
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Again, louder."},
    ]
    prompts = [Prompt(id="a", messages=user("héllo")), Prompt(id="b", messages=chat, source="self_instruct")]
    write_jsonl(path, prompts)
    assert read_jsonl(path, Prompt) == prompts
    # no temp files left behind
    assert os.listdir(path.parent) == ["prompts.jsonl"]


def test_failed_write_leaves_previous_file(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [Prompt(id="a", messages=user("one"))])

    def broken():
        yield Prompt(id="b", messages=user("two"))
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        write_jsonl(path, broken())
    assert read_jsonl(path, Prompt) == [Prompt(id="a", messages=user("one"))]
    assert os.listdir(tmp_path) == ["p.jsonl"]


def test_read_jsonl_names_bad_line(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps(Generation("p", user("q"), 0, "t", 1).to_dict()) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"g.jsonl: line 2 is not valid JSON"):
        read_jsonl(path, Generation)


def test_unknown_fields_and_bad_messages_rejected():
    pair = {"prompt_id": "p", "messages": user("q"), "chosen": "a", "rejected": "b", "chosen_score": 1, "rejected_score": 0}
    assert Pair.from_dict(pair).messages == user("q")
    with pytest.raises(ValueError, match="unknown fields"):
        Pair.from_dict({**pair, "bogus": 1})
    with pytest.raises(ValueError, match=r"unknown fields \['prompt'\]"):  # the pre-messages format
        Pair.from_dict({**pair, "prompt": "q"})
    with pytest.raises(ValueError, match="end with a user turn"):
        Pair.from_dict({**pair, "messages": [*user("q"), {"role": "assistant", "content": "a"}]})


def test_round_stage_files_and_manifest(tmp_path):
    store = RunStore(tmp_path / "run")
    store.create({"rounds": 2}, "rounds: 2\n")
    rnd = store.round(1)
    assert not rnd.has("prompts")
    rnd.write("prompts", [Prompt(id="a", messages=user("q"))], {"prompts/seed": 1.0})
    assert rnd.has("prompts") and rnd.metrics("prompts") == {"prompts/seed": 1.0}
    store.update_round(1, status="done")
    again = RunStore(tmp_path / "run")
    again.load()
    assert again.completed_rounds() == [1]


def test_publish_dir_replaces_leftover(tmp_path):
    tmp, final = tmp_path / "ckpt.tmp", tmp_path / "ckpt"
    final.mkdir()
    (final / "stale").write_text("old")
    tmp.mkdir()
    (tmp / "config.json").write_text("{}")
    publish_dir(tmp, final)
    assert sorted(os.listdir(final)) == ["config.json"] and not tmp.exists()
