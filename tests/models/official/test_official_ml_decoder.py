"""Official ML-Decoder releases: the five key lists import strictly, values map right, CLI convert and eval."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mlic.cli import app
from mlic.config import ModelConfig
from mlic.engine.checkpoint import load_model
from mlic.models.classifier import build_model
from mlic.models.official import COCO_CLASSES, OfficialCheckpointError, load_ml_decoder
from mlic.models.official.ml_decoder import map_ml_decoder_state_dict
from mlic.models.official.release_file import check_against_model

KEY_LISTS = Path(__file__).resolve().parents[3] / ".." / "shared" / "reference" / "ml_decoder_keys"
KEY_FILES = sorted(KEY_LISTS.glob("*.txt")) if KEY_LISTS.is_dir() else []
BACKBONE = {"tresnet_m": "tresnet_m", "tresnet_l": "tresnet_v2_l", "tresnet_xl": "tresnet_v2_xl"}


def read_key_list(path: Path, counters: bool = False) -> tuple[dict, dict[str, tuple]]:
    """(release config, key -> shape); ``counters`` adds the inplace_abn >= 1.1.0 ``num_batches_tracked``."""
    lines = path.read_text().splitlines()
    config = ast.literal_eval(re.search(r"config=(\{.*?\});", lines[0]).group(1))
    keys: dict[str, tuple] = {}
    for line in lines:
        if line.startswith("#"):
            continue
        key, shape, _ = line.split("\t")
        keys[key] = ast.literal_eval(shape)
        if counters and key.endswith(".running_var"):
            keys[key[: -len("running_var")] + "num_batches_tracked"] = ()
    return config, keys


def random_state(keys: dict[str, tuple], device: str = "cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors of the listed shapes; InPlaceABN weights of both signs, positive running variances."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in keys.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros(shape, dtype=torch.long, device=device)
        elif device == "meta":
            state[key] = torch.empty(shape, device="meta")
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.05
    return state


@functools.cache
def meta_parts(backbone: str, num_classes: int, groups: int) -> tuple[dict, int]:
    """(our model's state dict on the meta device, its parameter count), built once per release shape."""
    with torch.device("meta"):
        model = build_model(ModelConfig(backbone=backbone, head="ml_decoder", num_classes=num_classes,
                                        head_args={"num_of_groups": groups}))
    return model.state_dict(), sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("counters", [False, True], ids=["inplace_abn_1.0", "inplace_abn_1.1"])
@pytest.mark.parametrize("path", KEY_FILES, ids=[p.stem for p in KEY_FILES])
def test_release_key_list_imports_strictly(path, counters):
    config, keys = read_key_list(path, counters)
    mapped, backbone, head_args = map_ml_decoder_state_dict(random_state(keys, "meta"), str(path))
    assert backbone == BACKBONE[config["model_name"]]
    assert head_args == {"num_of_groups": config["queries"], "decoder_embedding": 768, "dim_feedforward": 2048}
    expected, n_params = meta_parts(backbone, config["num_classes"], config["queries"])
    check_against_model(mapped, expected, str(path))
    assert expected["head.decoder.duplicate_pooling"].shape[2] == config["duplicate_factor"]
    assert n_params == int(re.search(r"n_params=(\d+)", path.read_text().splitlines()[0]).group(1))


def test_all_five_releases_are_listed():
    if not KEY_FILES:
        pytest.skip(f"shared key lists not found at {KEY_LISTS}")
    assert len(KEY_FILES) == 5


@pytest.fixture(scope="module")
def tresnet_m_release():
    path = KEY_LISTS / "tresnet_m_COCO_224_84_2.txt"
    if not path.is_file():
        pytest.skip(f"shared key list not found at {path}")
    return random_state(read_key_list(path)[1])


def test_release_values_map_right(tresnet_m_release):
    state = tresnet_m_release
    model, classes = load_ml_decoder({"model": state})
    ours = model.state_dict()
    assert classes == COCO_CLASSES and model.config.backbone == "tresnet_m" and model.config.img_size == 224
    assert model.config.mean == (0.0, 0.0, 0.0) and model.config.std == (1.0, 1.0, 1.0) and not model.training
    stem, strided = "body.conv1.1.weight", "body.layer2.0.conv1.0.1.weight"  # BasicBlock strided conv: 0.0 / 0.1
    assert (state[stem] < 0).any()
    torch.testing.assert_close(ours["backbone.body.body.conv1.bn.weight"], state[stem].abs() + 1e-5, atol=0, rtol=0)
    torch.testing.assert_close(ours["backbone.body.body.layer2.0.conv1.bn.weight"], state[strided].abs() + 1e-5,
                               atol=0, rtol=0)
    assert torch.equal(ours["backbone.body.body.layer2.0.conv1.conv.weight"], state["body.layer2.0.conv1.0.0.weight"])
    assert torch.equal(ours["backbone.body.body.layer3.0.downsample.1.bn.bias"],
                       state["body.layer3.0.downsample.1.1.bias"])
    assert torch.equal(ours["backbone.body.body.layer1.0.se.fc1.weight"], state["body.layer1.0.se.fc1.weight"])
    for key in [k for k in state if k.startswith("head.")]:
        assert torch.equal(ours[key], state[key]), key
    assert not model.head.decoder.query_embed.weight.requires_grad


def test_timm_fork_head_layout_is_accepted(tresnet_m_release):
    fork = {re.sub(r"^head\.decoder\.(duplicate_pooling|embed_standart|query_embed)", r"head.\1", k): v
            for k, v in tresnet_m_release.items()}
    assert "head.duplicate_pooling" in fork and "head.decoder.layers.0.norm1.weight" in fork
    model, _ = load_ml_decoder(fork)
    assert torch.equal(model.head.decoder.duplicate_pooling, tresnet_m_release["head.decoder.duplicate_pooling"])


def test_bad_input_is_one_clear_line(tresnet_m_release, tmp_path):
    release = tmp_path / "tresnet_m_COCO_224_84_2.pth"
    torch.save({"model": tresnet_m_release}, release)
    cases = [
        (lambda: load_ml_decoder(release, classes=["a", "b"]),
         f"{release}: holds weights for 80 classes but 2 class names were given; pass 80 names"),
        (lambda: load_ml_decoder({"model": {**tresnet_m_release, "head.decoder.duplicate_pooling_bias":
                                            torch.zeros(7)}}, classes=list("abcdefg")), "2 shape mismatch"),
        (lambda: load_ml_decoder({k: v for k, v in tresnet_m_release.items() if not k.startswith("body.layer4.2.")}),
         r"\[3, 4, 11, 2\] blocks per stage is none of the released backbones"),
        (lambda: load_ml_decoder({"model": {"conv1.weight": torch.zeros(1)}}), "not an ML-Decoder TResNet checkpoint"),
        (lambda: load_ml_decoder(tmp_path / "missing.pth"), "checkpoint not found"),
    ]
    for call, message in cases:
        with pytest.raises(OfficialCheckpointError, match=message) as info:
            call()
        assert "\n" not in str(info.value)
    other = {**tresnet_m_release, "head.decoder.duplicate_pooling_bias": torch.zeros(9),
             "head.decoder.duplicate_pooling": torch.zeros(9, 768, 1), "head.decoder.query_embed.weight":
             torch.zeros(9, 768)}
    with pytest.raises(OfficialCheckpointError, match="holds 9 classes and no idx_to_class names; pass a class names "
                                                      "file with 9 lines"):
        load_ml_decoder({"model": other})


runner = CliRunner()


def small_release(path: Path) -> dict[str, torch.Tensor]:
    """A TResNet-M + ML-Decoder file in the official layout: 3 classes, a narrow head (D 16, FFN 32)."""
    _, keys = read_key_list(KEY_LISTS / "tresnet_m_COCO_224_84_2.txt")
    keys = {k: s for k, s in keys.items() if k.startswith("body.")}
    head = build_model_head()
    keys.update({"head." + k: tuple(v.shape) for k, v in head.state_dict().items()})
    state = random_state(keys, seed=1)
    torch.save({"model": state, "idx_to_class": {0: "cat", 1: "dog", 2: "bird"}}, path)
    return state


def build_model_head():
    from mlic.models.heads import HEADS

    return HEADS["ml_decoder"](2048, 3, decoder_embedding=16, dim_feedforward=32)


def test_cli_convert_and_eval(tmp_path):
    if not KEY_LISTS.is_dir():
        pytest.skip(f"shared key lists not found at {KEY_LISTS}")
    from mlic.data.labelset import LabelSet

    release = tmp_path / "my_release.pth"
    state = small_release(release)
    result = runner.invoke(app, ["convert", "ml-decoder", str(release), "-o", str(tmp_path / "out"),
                                 "--img-size", "64"])
    assert result.exit_code == 0, result.output
    model, meta = load_model(tmp_path / "out")
    assert meta["classes"] == ["cat", "dog", "bird"] and meta["source"]["repo"] == "Alibaba-MIIL/ML_Decoder"
    assert model.config.img_size == 64 and model.head.dim == 16
    torch.testing.assert_close(model.state_dict()["backbone.body.body.layer4.2.conv3.bn.weight"],
                               state["body.layer4.2.conv3.1.weight"].abs() + 1e-5, atol=0, rtol=0)
    direct, meta_direct = load_model(release)  # what eval --checkpoint FILE does
    assert meta_direct["classes"] == meta["classes"] and direct.config.img_size == 224
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(direct(x), model(x), atol=0, rtol=0)

    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        pixels = np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
    targets = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], np.int8)
    LabelSet(["cat", "dog", "bird"], [f"{i}.png" for i in range(4)], targets, root=str(images)).save(tmp_path / "data")
    result = runner.invoke(app, ["eval", "--checkpoint", str(release), "--data", str(tmp_path / "data"),
                                 "--workers", "0", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert "mAP" in result.output

    result = runner.invoke(app, ["convert", "ml-decoder", str(release), "-o", str(tmp_path / "bad"), "--classes",
                                 str(images / "0.png")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    result = runner.invoke(app, ["eval", "--checkpoint", str(tmp_path / "other.pth")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: {tmp_path / 'other.pth'}: not an ML-Decoder TResNet checkpoint (no 'head.decoder.duplicate_pooling'); "
        "expected one of the authors' released .pth files (Alibaba-MIIL/ML_Decoder MODEL_ZOO.md)"]
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="pass the folder holding model.safetensors and model.json"):
        load_model(tmp_path / "model.safetensors")
