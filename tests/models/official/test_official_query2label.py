"""Official Query2Label import: conformance with the reference fixture, strict key maps, safe reading."""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mlic.config import IMAGENET_MEAN
from mlic.engine.checkpoint import load_model
from mlic.engine.convert import convert_query2label
from mlic.models.backbones import build_backbone
from mlic.models.classifier import build_model
from mlic.models.heads import sine_position_encoding
from mlic.models.official import COCO_CLASSES, OfficialCheckpointError, load_query2label
from mlic.models.official.query2label import (
    BACKBONES,
    PE_KEY,
    map_backbone_key,
    map_official_state_dict,
    model_config_from_official,
)
from mlic.models.official.release_file import check_against_model
from mlic.models.official.tresnet import tresnet_checkpoint_filter

SHARED = Path(__file__).resolve().parents[3] / ".." / "shared"
FIXTURE = SHARED / "fixtures" / "q2l_official_r101.pt"
KEY_LISTS = SHARED / "reference" / "q2l_keys"
TRESNET_FIXTURE = SHARED / "fixtures" / "q2l_tresnet_official.pt"


@pytest.fixture(scope="module")
def fixture():
    if not FIXTURE.is_file():
        pytest.skip(f"conformance fixture not found at {FIXTURE} (shared/ is not part of the repo)")
    return torch.load(FIXTURE, weights_only=False)  # our own trusted file


@pytest.fixture(scope="module")
def imported(fixture):
    return load_query2label(fixture["state_dict"], fixture["config"])


def test_fixture_logits_float64(fixture, imported):
    model = copy.deepcopy(imported).double()
    with torch.no_grad():
        logits = model(fixture["input"].double())
    diff = (logits - fixture["logits_float64"]).abs().max().item()
    assert diff <= 1e-6, f"float64 logits differ from the official by {diff:.3g}"


def test_fixture_logits_float32_and_intermediates(fixture, imported):
    x = fixture["input"]
    inter = fixture["intermediates"]
    head = imported.head
    with torch.no_grad():
        feat = imported.backbone(x)
        logits = imported.head(feat)  # = imported(x), without a second backbone pass
        proj = head.input_proj(feat)
        b, d, h, w = proj.shape
        pos = sine_position_encoding(h, w, d)
        memory = head.encoder(proj.flatten(2).transpose(1, 2), pos)
        hs, _ = head.decoder(memory, pos, head.query_embed.weight)
        logits_attn, maps = head(feat, return_attention=True)
    assert logits.shape == (2, 80) and logits.dtype == torch.float32
    assert (logits - fixture["logits"]).abs().max().item() <= 1e-3
    assert (logits.double() - fixture["logits_float64"]).abs().max().item() <= 1e-3
    torch.testing.assert_close(logits_attn, logits, atol=1e-5, rtol=0)
    assert maps.shape == (2, 80, 7, 7)

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    assert torch.equal(pos.T.reshape(1, d, h, w).expand(b, -1, -1, -1), inter["pos"])
    # float32 noise through 100 conv layers (see the fixture notes); the float64 test is the tight one
    assert rel(feat, inter["backbone_feat"]) < 1e-3
    assert rel(proj, inter["input_proj"]) < 1e-3
    assert rel(memory.transpose(0, 1), inter["encoder_memory"]) < 1e-3
    assert rel(hs.transpose(0, 1), inter["decoder_hs"][0]) < 1e-3


def test_fixture_config(imported):
    config = imported.config
    assert config.backbone == "resnet101" and config.head == "query2label" and config.img_size == 224
    assert config.head_args["hidden_dim"] == 256 and config.head_args["keep_input_proj"] is True
    assert config.mean == IMAGENET_MEAN and not imported.training


def read_key_list(path: Path) -> tuple[dict | None, dict[str, tuple]]:
    lines = path.read_text().splitlines()
    config = None
    if lines[0].startswith("#"):
        config = ast.literal_eval(re.search(r"config=(\{.*?\});", lines[0]).group(1))
        lines = lines[1:]
    keys = {}
    for line in lines:
        key, shape = line.split("\t")[:2]
        keys[key] = ast.literal_eval(shape)
    return config, keys


def official_state(keys: dict[str, tuple], device: str = "meta") -> dict[str, torch.Tensor]:
    """Tensors with exactly the listed official keys and shapes; the pe buffer holds the real encoding."""
    state = {}
    for key, shape in keys.items():
        if key == PE_KEY:
            _, d, s, _ = shape
            state[key] = sine_position_encoding(s, s, d).T.reshape(1, d, s, s)
        elif key.endswith("num_batches_tracked"):
            state[key] = torch.zeros(shape, dtype=torch.long, device=device)
        else:
            state[key] = torch.empty(shape, device=device)
    return state


KEY_FILES = sorted(KEY_LISTS.glob("keys_*.txt")) if KEY_LISTS.is_dir() else []


@pytest.mark.parametrize("path", KEY_FILES, ids=[p.stem for p in KEY_FILES])
def test_key_list_imports_strictly(path, request):
    config, keys = read_key_list(path)
    if config is None:  # the fixture's list: its config travels in the fixture
        config = request.getfixturevalue("fixture")["config"]
    model_config = model_config_from_official(config, str(path))
    with torch.device("meta"):
        model = build_model(model_config)
    _, family, stride = BACKBONES[config["backbone"]]
    mapped = map_official_state_dict(official_state(keys), model_config, family, stride, str(path))
    check_against_model(mapped, model.state_dict(), str(path))


def test_no_key_lists_means_skip():
    if not KEY_FILES:
        pytest.skip(f"shared key lists not found at {KEY_LISTS}")
    assert len(KEY_FILES) >= 6


def test_r101_448_release_loads_for_real():
    path = KEY_LISTS / "keys_r101_448.txt"
    if not path.is_file():
        pytest.skip(f"shared key list not found at {path}")
    config, keys = read_key_list(path)
    torch.manual_seed(0)
    state = official_state(keys, device="cpu")
    for key, value in state.items():
        if key != PE_KEY and value.is_floating_point():
            value.normal_()
    model = load_query2label(state, config)
    ours = model.state_dict()
    assert torch.equal(ours["head.fc.W"], state["fc.W"])
    assert torch.equal(ours["head.decoder.layers.1.multihead_attn.in_proj_weight"],
                       state["transformer.decoder.layers.1.multihead_attn.in_proj_weight"])
    assert torch.equal(ours["backbone.body.layer4.2.conv3.weight"], state["backbone.0.body.layer4.2.conv3.weight"])
    frozen_bn = sum(m.weight.numel() + m.bias.numel() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    # the release counts 193,801,488 parameters; its frozen BatchNorm affines are buffers there
    assert sum(p.numel() for p in model.parameters()) - frozen_bn == 193801488


# A small release-shaped model (ResNet-18, tiny head) for file-format tests.
SMALL = {"backbone": "resnet18", "num_class": 80, "img_size": 64, "hidden_dim": 32, "dim_feedforward": 64,
         "enc_layers": 1, "dec_layers": 2, "nheads": 4, "keep_input_proj": True, "dropout": 0.1, "pre_norm": False,
         "position_embedding": "sine", "orid_norm": False, "dataname": "coco14", "lr": 1e-4}


def to_official(state: dict[str, torch.Tensor], side: int, hidden: int) -> dict[str, torch.Tensor]:
    """Our ResNet Q2L state dict in official names (inverse of the importer's rules, for tests)."""
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.startswith("backbone.body."):
            out["backbone.0." + key[len("backbone."):]] = value
        elif key.startswith(("head.encoder.", "head.decoder.")):
            out["transformer." + key[len("head."):]] = value
        else:
            out[key[len("head."):]] = value
    out[PE_KEY] = sine_position_encoding(side, side, hidden).T.reshape(1, hidden, side, side)
    return out


@pytest.fixture(scope="module")
def small_release(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(model_config_from_official(SMALL)).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    folder = tmp_path_factory.mktemp("q2l_release")
    official = {"module." + k: v for k, v in to_official(model.state_dict(), 2, 32).items()}
    torch.save({"state_dict": official, "epoch": 12, "best_mAP": np.float64(84.9),
                "args": argparse.Namespace(**SMALL)}, folder / "checkpoint.pkl")
    (folder / "config_new.json").write_text(json.dumps(SMALL))
    return model, folder


def test_checkpoint_pkl_and_convert(small_release, tmp_path):
    model, folder = small_release
    x = torch.randn(2, 3, 64, 64)
    imported = load_query2label(folder / "checkpoint.pkl", folder / "config_new.json")
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(imported(x), expected, atol=0, rtol=0)
    by_file, _ = load_model(folder / "checkpoint.pkl")  # the file itself stands for its release folder
    with torch.no_grad():
        torch.testing.assert_close(by_file(x), expected, atol=0, rtol=0)
    out = convert_query2label(folder, tmp_path / "converted")
    loaded, meta = load_model(out)
    assert meta["classes"] == COCO_CLASSES and len(COCO_CLASSES) == 80 and meta["source"]["config"] == SMALL
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, atol=0, rtol=0)


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_refuses_pickled_code(tmp_path, capsys):
    path = tmp_path / "checkpoint.pkl"
    torch.save({"state_dict": {"fc.W": torch.zeros(1)}, "evil": Payload()}, path)
    with pytest.raises(OfficialCheckpointError, match="refused") as info:
        load_query2label(path, SMALL)
    assert str(path) in str(info.value)
    assert "this must never run" not in capsys.readouterr().out


def test_not_a_q2l_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pkl"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(64, 3, 7, 7)}}, path)
    with pytest.raises(OfficialCheckpointError, match="not a Query2Label checkpoint") as info:
        load_query2label(path, SMALL)
    assert str(path) in str(info.value)
    with pytest.raises(OfficialCheckpointError, match="not found"):
        load_query2label(tmp_path / "missing.pkl", SMALL)


@pytest.mark.parametrize("change,message", [
    ({"dim_feedforward": 128}, "shape mismatch"),
    ({"num_class": 20}, "shape mismatch"),
    ({"hidden_dim": 64}, "backbone.1.pe has shape"),
    ({"img_size": 96}, "backbone.1.pe has shape"),
    ({"keep_input_proj": False, "hidden_dim": 512}, "backbone.1.pe has shape"),
    ({"dec_layers": 3}, "missing"),
    ({"backbone": "tresnetl"}, "fit no rule"),
    ({"backbone": "vgg16"}, "not supported"),
    ({"pre_norm": True}, "pre_norm"),
])
def test_config_mismatch_is_one_clear_error(small_release, change, message):
    _, folder = small_release
    with pytest.raises(OfficialCheckpointError, match=message) as info:
        load_query2label(folder / "checkpoint.pkl", {**SMALL, **change})
    assert "checkpoint.pkl" in str(info.value) or "config" in str(info.value)


def test_other_position_encoding_is_refused(small_release):
    model, _ = small_release
    state = to_official(model.state_dict(), 2, 32)
    state[PE_KEY] = state[PE_KEY] + 0.01
    with pytest.raises(OfficialCheckpointError, match="another position encoding"):
        load_query2label(state, SMALL)


def test_config_translation():
    tres = model_config_from_official({**SMALL, "backbone": "tresnetl", "hidden_dim": 2432, "orid_norm": True})
    assert tres.backbone == "tresnet_l" and tres.mean == (0.0, 0.0, 0.0) and tres.std == (1.0, 1.0, 1.0)
    swin = model_config_from_official({**SMALL, "backbone": "swin_L_384_22k", "img_size": 384})
    assert swin.backbone == "swin_large_patch4_window12_384" and swin.backbone_args == {"img_size": 384}
    cvt = model_config_from_official({**SMALL, "backbone": "CvT_w24", "keep_other_self_attn_dec": True})
    assert cvt.backbone == "cvt_w24" and cvt.head_args["decoder_self_attn"] is True
    with pytest.raises(OfficialCheckpointError, match="missing 'hidden_dim'"):
        model_config_from_official({"backbone": "resnet101", "num_class": 80, "img_size": 448})


RECIPES = Path(__file__).resolve().parents[3] / "recipes"


@pytest.mark.parametrize("name,key_list", [("q2l_r101_448", "keys_r101_448.txt"), ("q2l_r101_576", "keys_r101_576.txt"),
                                           ("q2l_tresnetl_448", "keys_tresnetl_448.txt")])
def test_recipe_builds_the_release_architecture(name, key_list):
    from mlic.config import ModelConfig, TrainConfig, load_recipe

    model_dict, train_dict = load_recipe(RECIPES / f"{name}.yaml")
    recipe, train = ModelConfig.from_dict(model_dict), TrainConfig.from_dict(train_dict)
    assert train.loss == "asl" and train.loss_args["scale"] == 1000 and train.ema == 0.9997
    path = KEY_LISTS / key_list
    if not path.is_file():
        pytest.skip(f"shared key list not found at {path}")
    release = model_config_from_official(read_key_list(path)[0])  # the key lists' configs omit orid_norm
    assert (recipe.backbone, recipe.img_size) == (release.backbone, release.img_size)
    assert recipe.std == ((1.0, 1.0, 1.0) if "tresnet" in name else (0.229, 0.224, 0.225))
    with torch.device("meta"):
        ours, theirs = build_model(recipe).state_dict(), build_model(release).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    from mlic.engine.loop import freeze

    with torch.device("meta"):
        model = build_model(recipe)
    count = freeze(model, train.freeze)  # the engine's own freezing, on the release architecture
    frozen = {n for n, p in model.backbone.named_parameters() if not p.requires_grad}
    named = {id(p): n for n, p in model.backbone.named_parameters()}
    expected = {named[id(p)] for prefix in train.freeze  # looked up as modules, not as name prefixes
                for p in model.backbone.body.get_submodule(prefix).parameters()}
    assert count == len(frozen) > 0 and frozen == expected
    assert any(p.requires_grad for p in model.backbone.parameters())  # the rest still trains


# --- the TResNet releases: InPlaceABN weights (q2l_tresnet_official.pt, see QUERY2LABEL.md) ---

@pytest.fixture(scope="module")
def tresnet_fixture():
    if not TRESNET_FIXTURE.is_file():
        pytest.skip(f"conformance fixture not found at {TRESNET_FIXTURE} (shared/ is not part of the repo)")
    data = torch.load(TRESNET_FIXTURE, weights_only=True)
    rules: dict = {}
    exec(data["meta"]["rule_source"], rules)  # our own trusted file: the weights as a function of key and shape
    return data, rules


def stage_diff(ours: torch.Tensor, summary: dict) -> float:
    assert tuple(ours.shape) == tuple(summary["shape"])
    return (ours.double().reshape(-1)[:: summary["step"]] - summary["sample"]).abs().max().item()


# tresnetl (BasicBlock stages, 448 px) up to layer1; tresnetl_v2 (Bottleneck, both shortcut kinds, blur) to layer2
@pytest.mark.parametrize("case,stages", [("tresnetl_s448", ("conv1", "layer1")),
                                         ("tresnetl_v2_s224", ("conv1", "layer1", "layer2"))])
def test_tresnet_inplace_abn_weights_match_official_stages(tresnet_fixture, case, stages):
    """The first stages of the official InPlaceABN TResNets, through the importer's backbone rules, in float64."""
    data, rules = tresnet_fixture
    meta, expected = data["meta"], data["results"][case]["stages"]
    prefixes = tuple(f"backbone.0.body.body.{s}." for s in stages)
    official = rules["make_state_dict"]([(k, s) for k, s in meta["keys"][case] if k.startswith(prefixes)], 0)
    assert any((v < 0).any() for k, v in official.items() if k.endswith(".1.weight"))  # InPlaceABN signs
    converted = tresnet_checkpoint_filter({map_backbone_key(k, "tresnet"): v for k, v in official.items()},
                                          "backbone.body.")
    assert len(converted) == len(official)  # these inplace_abn 1.1 files have their counters
    renamed = dict(zip(converted, official.values()))  # the filter keeps the order: renames without |w| + eps
    config = model_config_from_official(meta["cases"][case]["config"])
    backbone = build_backbone(config.backbone).double().eval()
    x = rules["make_input"](**{k: meta["inputs"][case][k] for k in ("batch", "size", "seed")}).double()

    def run(state, upto):
        own = backbone.state_dict()
        state = {k[len("backbone."):]: v for k, v in state.items()}
        assert set(state) <= set(own) and all(state[k].shape == own[k].shape for k in state)
        backbone.load_state_dict({**own, **state}, strict=True)
        out, y = {}, backbone.body.body.s2d(x)
        with torch.no_grad():
            for name in upto:
                y = out[name] = getattr(backbone.body.body, name)(y)
        return out

    for name, value in run(converted, stages).items():
        diff = stage_diff(value, expected[name])
        assert diff <= 1e-11, f"{case} {name} differs from the official by {diff:.3g}"
    assert stage_diff(run(renamed, ("conv1",))["conv1"], expected["conv1"]) > 1  # renames alone: the old import


@pytest.mark.skipif(not os.environ.get("MLIC_SLOW_TESTS"), reason="full TResNet-L Q2L forward in float64 "
                    "(~50 s, 4 GB per case); set MLIC_SLOW_TESTS=1")
@pytest.mark.parametrize("case", ["tresnetl_s448", "tresnetl_v2_s224"])
def test_tresnet_release_logits_match_official(tresnet_fixture, case):
    data, rules = tresnet_fixture
    meta, expected = data["meta"], data["results"][case]
    state = rules["make_state_dict"](meta["keys"][case], meta["offset"])
    x = rules["make_input"](**{k: meta["inputs"][case][k] for k in ("batch", "size", "seed")})
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # |w| + 1e-5 is not float32-exact: keep it in float64
    try:
        model = load_query2label(state, meta["cases"][case]["config"]).double()
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        features = model.backbone(x.double())
        logits = model.head(features)
    assert stage_diff(features, expected["stages"]["features"]) <= 1e-11
    diff = (logits - expected["logits"]).abs().max().item()
    assert diff <= 1e-10, f"{case}: float64 logits differ from the official by {diff:.3g}"
