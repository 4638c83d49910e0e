"""mlic.config: every refusal is one line naming its option; dict round trips; the linear probe's batch rule;
recipes."""

from __future__ import annotations

import json
import math
from dataclasses import fields

import pytest

from mlic.config import RECIPE_SECTIONS, ModelConfig, TrainConfig, load_recipe, read_recipe
from mlic.errors import MlicError

BAD_TRAIN = [
    ("epochs", 0), ("epochs", 1.5), ("batch_size", 0), ("lr", 0.0), ("lr", math.nan), ("lr", True),
    ("weight_decay", -1e-4), ("schedule", "cosine"), ("pct_start", 1.0), ("ema", 1.0), ("ema", math.inf),
    ("clip_grad", -1.0), ("amp", "fp8"), ("workers", -1), ("threads", 0), ("seed", -1), ("seed", 0.5),
    ("augment", "heavy"), ("decode_device", "tpu"), ("estimator_lr_mult", 0.0), ("optimizer", "sgd"),
    ("estimator_update", "slow"), ("betas", (0.9,)), ("betas", (0.9, 1.0)), ("adam_eps", 0.0),
    ("matmul_threads", 0),
]


@pytest.mark.parametrize(("field", "value"), BAD_TRAIN, ids=[f"{f}={v!r}" for f, v in BAD_TRAIN])
def test_each_train_refusal_is_one_line_naming_the_option(field, value):
    with pytest.raises(MlicError) as caught:
        TrainConfig(**{field: value})
    message = str(caught.value)
    assert message.startswith(f"--{field.replace('_', '-')} {value!r}: ") and "\n" not in message


def test_every_checked_train_field_is_covered_here():
    """A new rule in TrainConfig.__post_init__ for a field none of BAD_TRAIN names would go untested."""
    unchecked = {"loss", "loss_args", "hflip", "freeze", "channels_last", "fused", "drop_last"}  # free-form
    assert {f.name for f in fields(TrainConfig)} - unchecked == {field for field, _ in BAD_TRAIN}


@pytest.mark.parametrize(("kwargs", "start"), [
    ({"img_size": 8}, "--img-size 8: "), ({"img_size": 5000}, "--img-size 5000: "),
    ({"img_size": 64.0}, "--img-size 64.0: "), ({"num_classes": 0}, "num_classes 0: "),
])
def test_each_model_refusal_is_one_line_naming_the_option(kwargs, start):
    with pytest.raises(MlicError) as caught:
        ModelConfig(**kwargs)
    assert str(caught.value).startswith(start) and "\n" not in str(caught.value)


def test_defaults_are_accepted():
    TrainConfig()
    ModelConfig()


def test_train_config_round_trips_through_json():
    config = TrainConfig(epochs=3, loss="role", loss_args={"lr_mult": 2}, betas=(0.8, 0.95), freeze=["conv1"],
                         workers=0, threads=2)
    data = json.loads(json.dumps(config.to_dict()))  # what a checkpoint stores
    back = TrainConfig.from_dict(data)
    assert back == config and back.betas == (0.8, 0.95) and isinstance(back.betas, tuple)


def test_model_config_round_trips_through_json():
    config = ModelConfig(backbone="resnet18", head="query2label", num_classes=80, img_size=224,
                         head_args={"hidden_dim": 64}, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    data = json.loads(json.dumps(config.to_dict()))
    assert data["mean"] == [0.0, 0.0, 0.0]
    back = ModelConfig.from_dict(data)
    assert back == config and isinstance(back.mean, tuple) and isinstance(back.std, tuple)


@pytest.mark.parametrize(("cls", "what"), [(TrainConfig, "train"), (ModelConfig, "model")])
def test_unknown_fields_are_refused(cls, what):
    with pytest.raises(MlicError, match=rf"^unknown {what} config fields: \['bogus', 'lr_max'\]$"):
        cls.from_dict({"lr_max": 1, "bogus": 2})


@pytest.mark.parametrize(("num_images", "batch"), [
    (None, 1024), (32 * 1024, 1024), (10**6, 1024), (32 * 1024 - 32, 1023), (3200, 100), (512, 16), (10, 16),
])
def test_linear_defaults_batch_rule(num_images, batch):
    """Batch 1024, or N // 32 (at least 32 steps an epoch) on small data, never under 16."""
    assert TrainConfig.linear_defaults(num_images).batch_size == batch


def test_linear_defaults_settings_and_overrides():
    config = TrainConfig.linear_defaults(100, lr=1e-3, loss="role")
    assert (config.epochs, config.lr, config.optimizer, config.schedule, config.amp, config.loss) == \
        (25, 1e-3, "adam", "constant", "off", "role")
    assert (config.weight_decay, config.ema, config.clip_grad) == (0.0, 0.0, 0.0)
    assert TrainConfig.linear_defaults(10**6, batch_size=64).batch_size == 64
    official = TrainConfig.official_linear()
    assert (official.batch_size, official.lr, official.estimator_update, official.fused) == (16, 1e-3, "official",
                                                                                            False)
    with pytest.raises(MlicError, match="unknown train config fields"):
        TrainConfig.linear_defaults(100, batch=8)


def test_read_recipe_returns_every_section(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("mode: linear-init\nmodel:\n  backbone: resnet50\ntrain:\n  epochs: 3\n")
    sections = read_recipe(path)
    assert list(sections) == list(RECIPE_SECTIONS)
    assert sections["mode"] == "linear-init" and sections["model"] == {"backbone": "resnet50"}
    assert sections["linear"] is None and sections["description"] is None
    assert load_recipe(path) == ({"backbone": "resnet50"}, {"epochs": 3})
    (tmp_path / "empty.yaml").write_text("")
    assert load_recipe(tmp_path / "empty.yaml") == ({}, {})


@pytest.mark.parametrize(("text", "message"), [
    (None, "cannot read recipe"),
    ("model: [unclosed\n", "cannot read recipe"),
    ("- a\n- b\n", "a recipe holds only the sections description, mode, model, train, linear"),
    ("model: {}\nmodle: {}\n", "a recipe holds only the sections"),
])
def test_read_recipe_errors_name_the_file(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(MlicError) as caught:
        read_recipe(path)
    assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value)


@pytest.mark.xfail(strict=True, reason="read_recipe puts PyYAML's multi-line message into its error; the CLI's "
                                       "rule is one line (fix in mlic/config.py, then drop this mark)")
def test_a_malformed_recipe_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(MlicError) as caught:
        read_recipe(path)
    assert "\n" not in str(caught.value)
