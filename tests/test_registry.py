"""mlic.registry: the tables of losses, heads, backbones and readers, their decorators, and no import cycle."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import mlic
from mlic import registry
from mlic.data.labelset import LabelSet
from mlic.errors import MlicError

# what each package registers today: a module that stops registering (or a member no __init__ imports) fails here
LOSSES = {"an", "an_ls", "asl", "bce", "bce_ls", "em", "em_apl", "epr", "focal", "gr", "hill", "ll_cp", "ll_ct",
          "ll_r", "role", "splc", "wan"}
HEADS = {"boostlu", "linear", "ml_decoder", "query2label"}
BACKBONES = {"cvt_w24", "digitnet", "tresnet_v2_xl"}
READERS = {"coco", "cole", "cub", "nuswide", "openimages", "table", "voc"}


@pytest.fixture
def scratch_names():
    """Names a test registers, removed from their tables afterwards so no other test sees them."""
    added: list[tuple[dict, str]] = []
    yield lambda table, name: added.append((table, name)) or name
    for table, name in added:
        table.pop(name, None)


def test_import_registry_imports_nothing_else_of_mlic():
    code = "import mlic.registry, sys; print(sorted(m for m in sys.modules if m.startswith('mlic')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "['mlic', 'mlic.errors', 'mlic.registry']"


@pytest.mark.parametrize("package", ["mlic.models.heads", "mlic.losses.gr", "mlic.data.coco"])
def test_each_package_imports_alone(package):
    """Importing one member first, in a fresh interpreter, works (no cycle) and registers the package's all."""
    table = {"losses": "LOSSES", "models": "HEADS", "data": "READERS"}[package.split(".")[1]]
    code = f"import {package}, mlic.registry as r; print(' '.join(r.{table}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert {"LOSSES": LOSSES, "HEADS": HEADS, "READERS": READERS}[table] <= set(done.stdout.split())


@pytest.mark.parametrize(("listing", "table", "expected"), [
    (registry.list_losses, registry.LOSSES, LOSSES), (registry.list_heads, registry.HEADS, HEADS),
    (registry.list_backbones, registry.BACKBONES, BACKBONES), (registry.list_readers, registry.READERS, READERS),
])
def test_every_registered_member_is_listed(listing, table, expected):
    names = listing()
    assert names == sorted(table) and expected <= set(names)


def test_the_packages_hand_on_the_registry_tables():
    from mlic.data.prepare import READERS as prepare_readers
    from mlic.losses import LOSSES as losses
    from mlic.models.backbones import BACKBONES as backbones
    from mlic.models.heads import HEADS as heads

    assert (losses, heads, backbones, prepare_readers) == (registry.LOSSES, registry.HEADS, registry.BACKBONES,
                                                          registry.READERS)
    assert losses is registry.LOSSES and heads is registry.HEADS and prepare_readers is registry.READERS
    for name in ("register_loss", "register_head", "register_backbone", "register_reader"):
        assert getattr(mlic, name) is getattr(registry, name)


@pytest.mark.parametrize(("decorator", "name", "kind"), [
    (registry.register_loss, "bce", "loss"), (registry.register_head, "linear", "head"),
    (registry.register_backbone, "digitnet", "backbone"), (registry.register_reader, "coco", "reader"),
])
def test_a_name_registered_twice_is_refused(decorator, name, kind):
    registry.list_losses(), registry.list_heads(), registry.list_readers()  # the built-ins are in
    tables = (registry.LOSSES, registry.HEADS, registry.BACKBONES, registry.READERS)
    before = [dict(t) for t in tables]
    with pytest.raises(MlicError, match=f"^{kind} '{name}' is registered twice$"):
        decorator(name)(object)
    assert [dict(t) for t in tables] == before  # the first entry stays


def test_registrar_on_a_table_of_ones_own():
    table: dict = {}
    register = registry.registrar(table, "thing")

    @register("a")
    def a():
        return 1

    assert table == {"a": a} and a() == 1  # the decorator hands the function back unchanged
    with pytest.raises(MlicError, match="thing 'a' is registered twice"):
        register("a")(lambda: 2)


@pytest.mark.parametrize(("get", "kind"), [(registry.get_loss, "loss"), (registry.get_head, "head"),
                                           (registry.get_backbone, "backbone"),
                                           (registry.get_reader, "data set kind")])
def test_get_unknown_name_lists_the_choices(get, kind):
    with pytest.raises(MlicError, match=f"unknown {kind} 'nope'; choose one of: ") as caught:
        get("nope")
    assert "\n" not in str(caught.value)


def test_get_returns_what_was_registered():
    from mlic.data.coco import prepare_coco
    from mlic.losses.full import BCE
    from mlic.models.heads import LinearHead

    assert registry.get_loss("bce") is BCE and registry.get_head("linear") is LinearHead
    assert registry.get_reader("coco") is prepare_coco


def test_user_loss_builds_and_lists(scratch_names):
    from mlic.losses import build_loss

    name = scratch_names(registry.LOSSES, "test_sum")

    @mlic.register_loss(name)
    class SumLoss(nn.Module):
        paper = "a test"
        labels = "full"

        def __init__(self, scale: float = 1.0) -> None:
            super().__init__()
            self.scale = scale

        def forward(self, logits, targets, indices=None):
            return self.scale * logits.sum()

    loss = build_loss("test-sum", scale=2.0)  # the name is normalised as for the built-ins
    assert isinstance(loss, SumLoss) and float(loss(torch.ones(2, 3), torch.ones(2, 3))) == 12.0
    assert name in registry.list_losses()
    with pytest.raises(MlicError, match="--loss-arg nope: not a setting of loss 'test_sum'"):
        build_loss(name, nope=1)


def test_user_head_builds_a_model(scratch_names):
    from mlic.config import ModelConfig
    from mlic.models.classifier import build_model

    name = scratch_names(registry.HEADS, "test_mean_head")

    @mlic.register_head(name)
    class MeanHead(nn.Module):
        def __init__(self, in_channels: int, num_classes: int) -> None:
            super().__init__()
            self.fc = nn.Linear(in_channels, num_classes)

        def forward(self, features):
            return self.fc(features.mean(dim=(2, 3)))

    model = build_model(ModelConfig(head=name, num_classes=3, img_size=32))
    assert isinstance(model.head, MeanHead) and model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_user_reader_is_a_prepare_kind(scratch_names, tmp_path):
    from mlic.data.prepare import kind_options, prepare

    name = scratch_names(registry.READERS, "test_squares")

    @mlic.register_reader(name)
    def read_squares(root, count: int = 4):
        targets = np.eye(2, dtype=np.int8)[np.arange(int(count)) % 2]
        return {"train": LabelSet(["even", "odd"], [f"{i}.png" for i in range(int(count))], targets, root=str(root))}

    assert kind_options(name) == {"count": 4}
    written = prepare(name, tmp_path, tmp_path / "prepared", count=6)
    assert set(written) == {"train"} and len(LabelSet.load(written["train"])) == 6
    with pytest.raises(MlicError, match="unknown option"):
        prepare(name, tmp_path, tmp_path / "other", size=3)


def test_mlic_losses_lists_every_loss():
    from mlic.cli import app

    result = CliRunner().invoke(app, ["losses"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    listed = {line.split()[0] for line in result.output.splitlines() if line and not line[0].isspace()}
    assert listed == set(registry.list_losses()) and LOSSES <= listed


def test_cli_help_texts_come_from_the_registry():
    from mlic.cli import app, registered
    from mlic.data.prepare import kind_options

    assert registered("loss") == ", ".join(sorted(registry.LOSSES))
    assert registered("reader") == ", ".join(sorted(registry.READERS))
    result = CliRunner().invoke(app, ["prepare", "--help"], env={"COLUMNS": "400"}, catch_exceptions=False)
    text = " ".join(result.output.split())
    assert registered("reader") in text
    for kind in registry.list_readers():
        assert f"{kind} " in text
        for option in kind_options(kind):
            assert option in text, (kind, option)
    assert "order=all|cole" in text and "difficult=unknown|positive|negative" in text and "min_certainty=1" in text
