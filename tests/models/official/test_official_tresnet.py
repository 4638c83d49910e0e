"""The TResNet checkpoint filter equals timm's ``tresnet.checkpoint_filter_fn`` on the released key layouts."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from timm.models.tresnet import checkpoint_filter_fn

from mlic.models.official.tresnet import tresnet_checkpoint_filter

REFERENCE = Path(__file__).resolve().parents[3] / ".." / "shared" / "reference"
# each release's TResNet keys start with "body." after this prefix
RELEASES = ([(p, "") for p in sorted((REFERENCE / "ml_decoder_keys").glob("*.txt"))]
            + [(p, "backbone.0.body.") for p in sorted((REFERENCE / "q2l_keys").glob("keys_tresnet*.txt"))])


def tresnet_state(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The release's TResNet keys (official names, ``body.*``) with random float64 values of both signs."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            continue
        key, shape = line.split("\t")[:2]
        if key.startswith(prefix + "body."):
            shape = ast.literal_eval(shape)
            state[key[len(prefix):]] = (torch.tensor(0) if key.endswith("num_batches_tracked")
                                        else torch.randn(shape, generator=g, dtype=torch.float64))
    return state


@pytest.mark.parametrize("path,prefix", RELEASES, ids=[p.stem for p, _ in RELEASES])
def test_filter_equals_timms(path, prefix):
    official = tresnet_state(path, prefix)
    assert any(k.endswith(".0.0.weight") for k in official) and any(".downsample." in k for k in official)
    timms = checkpoint_filter_fn({k: v.clone() for k, v in official.items()}, None)
    head = torch.ones(3)
    ours = tresnet_checkpoint_filter({**{"backbone.body." + k: v for k, v in official.items()}, "head.fc.W": head},
                                     "backbone.body.")
    assert ours.pop("head.fc.W") is head  # keys outside the prefix pass unchanged
    ours = {k[len("backbone.body."):]: v for k, v in ours.items()}
    assert set(timms) <= set(ours)
    for key, value in timms.items():
        assert torch.equal(ours[key], value), key
    added = set(ours) - set(timms)  # only the counters inplace_abn 1.0.x files lack
    assert all(k.endswith(".bn.num_batches_tracked") and ours[k].item() == 0 for k in added)
    assert {k for k in ours if k.endswith(".bn.running_var")} == {
        k[: -len("num_batches_tracked")] + "running_var" for k in ours if k.endswith("num_batches_tracked")}


def test_filter_renames_and_converts_inplace_abn():
    w = torch.tensor([-0.5, 0.0, 2.0])
    state = {"body.conv1.0.weight": torch.ones(3, 48, 3, 3), "body.conv1.1.weight": w,
             "body.conv1.1.running_var": torch.ones(3), "body.layer2.0.conv1.0.0.weight": torch.ones(1),
             "body.layer2.0.conv1.0.1.bias": torch.ones(1), "body.layer3.0.downsample.1.0.weight": torch.ones(1),
             "body.layer3.0.downsample.1.1.weight": w, "body.layer1.0.se.fc1.weight": torch.ones(1)}
    out = tresnet_checkpoint_filter(state)
    assert set(out) == {"body.conv1.conv.weight", "body.conv1.bn.weight", "body.conv1.bn.running_var",
                        "body.conv1.bn.num_batches_tracked", "body.layer2.0.conv1.conv.weight",
                        "body.layer2.0.conv1.bn.bias", "body.layer3.0.downsample.1.conv.weight",
                        "body.layer3.0.downsample.1.bn.weight", "body.layer1.0.se.fc1.weight"}
    expected = torch.tensor([0.5 + 1e-5, 1e-5, 2.0 + 1e-5])
    assert torch.equal(out["body.conv1.bn.weight"], expected)
    assert torch.equal(out["body.layer3.0.downsample.1.bn.weight"], expected)


def test_all_release_layouts_are_checked():
    if not RELEASES:
        pytest.skip(f"shared key lists not found at {REFERENCE}")
    assert len(RELEASES) == 7
