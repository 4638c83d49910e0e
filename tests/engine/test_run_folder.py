"""Claiming a run folder (one writer, manifest, --resume / --overwrite) and a folder for a converted model."""

import json

import pytest

from mlic.config import ModelConfig
from mlic.engine.checkpoint import CheckpointError, save_model
from mlic.engine.run_folder import claim_model_dir, claim_run_dir
from mlic.models.classifier import build_model


def saved(tmp_path, name="m"):
    cfg = ModelConfig(num_classes=3, img_size=32)
    return save_model(tmp_path / name, build_model(cfg), cfg, ["a", "b", "c"])


def test_claiming_a_folder_clears_killed_writes_and_never_leaves_it(tmp_path):
    import os

    from mlic.outputs import unlock_folder

    out = tmp_path / "run"
    out.mkdir()
    dead = 2 ** 22 + 12345  # above the default pid_max: no live process has it
    leftovers = [out / f".model.safetensors.{dead}-abc123.tmp", out / f".metrics.jsonl.{dead}-x_9.tmp"]
    for path in leftovers:
        path.write_bytes(b"half")
    live = out / f".model.json.{os.getpid()}-zzz.tmp"  # this process's own: removed too (it is not writing it now)
    live.write_bytes(b"x")
    keep = out / ".model.json.1-abc.tmp"  # pid 1 is alive: another writer's, left alone
    keep.write_bytes(b"x")
    (out / ".mlic-run.json").write_text(json.dumps({"files": ["../outside", "/etc", "model.json"]}))
    (tmp_path / "outside").mkdir()
    claim_run_dir(out)
    unlock_folder(out)
    assert not any(p.exists() for p in leftovers) and not live.exists() and keep.exists()
    assert (tmp_path / "outside").is_dir()


def test_a_converted_model_never_lands_on_a_foreign_model_json(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "model.json").write_text('{"my": "own notes"}')
    with pytest.raises(CheckpointError, match="holds a model.json that mlic did not write"):
        claim_model_dir(tmp_path / "x")
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="without its model.json"):
        claim_model_dir(tmp_path / "y")
    claim_model_dir(saved(tmp_path))  # mlic's own model folder: replaced
