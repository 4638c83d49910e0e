"""In-house CvT: the official parameter layout, the attention formula, shapes, weight loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mlic.models.backbones import WeightsError, build_backbone
from mlic.models.cvt import CvT, CvTSpec

KEYS = Path(__file__).resolve().parents[2] / ".." / "shared" / "reference" / "q2l_keys" / "keys_cvt_w24_384.txt"
TINY = CvTSpec(dims=(8, 16, 24), depths=(1, 1, 2), heads=(1, 2, 3))


def official_attention(attn, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """microsoft/CvT's Attention.forward spelled out: einsum scores scaled by dim ** -0.5."""
    cls, rest = (x[:, :1], x[:, 1:]) if attn.with_cls_token else (None, x)
    grid = rest.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
    q, k, v = (p(grid).flatten(2).transpose(1, 2) for p in (attn.conv_proj_q, attn.conv_proj_k, attn.conv_proj_v))
    if cls is not None:
        q, k, v = (torch.cat((cls, t), 1) for t in (q, k, v))
    nh = attn.num_heads

    def heads(t):
        b, n, c = t.shape
        return t.reshape(b, n, nh, c // nh).permute(0, 2, 1, 3)

    q, k, v = heads(attn.proj_q(q)), heads(attn.proj_k(k)), heads(attn.proj_v(v))
    scores = torch.einsum("bhlk,bhtk->bhlt", q, k) * x.shape[2] ** -0.5
    out = torch.einsum("bhlt,bhtv->bhlv", scores.softmax(-1), v)
    return attn.proj(out.permute(0, 2, 1, 3).reshape(x.shape[0], -1, x.shape[2]))


@pytest.mark.parametrize("stage", [0, 2])
def test_attention_matches_official_formula(stage):
    torch.manual_seed(0)
    model = CvT(TINY).eval().double()
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    block = getattr(model, f"stage{stage}").blocks[0]
    dim = TINY.dims[stage]
    h, w = 6, 5
    x = torch.randn(2, h * w + int(TINY.cls_token[stage]), dim, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block.attn(x, h, w), official_attention(block.attn, x, h, w), atol=1e-12, rtol=0)


def test_shapes_and_backward():
    torch.manual_seed(0)
    model = CvT(TINY, drop_path_rate=0.1)
    out = model(torch.randn(2, 3, 64, 48))
    assert out.shape == (2, 24, 4, 3) and model.num_channels == 24
    out.mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name


def test_w24_matches_official_key_list():
    if not KEYS.is_file():
        pytest.skip(f"shared reference key list not found at {KEYS}")
    official = {}
    for line in KEYS.read_text().splitlines():
        if line.startswith("#"):
            continue
        key, shape = line.split("\t")[:2]
        if key.startswith("backbone.0."):
            official[key[len("backbone.0."):]] = shape
    with torch.device("meta"):
        model = build_backbone("cvt_w24")
    ours = {k: str(tuple(v.shape)) for k, v in model.state_dict().items()}
    assert ours == official
    assert model.num_channels == 1024


def test_pretrained_loading(tmp_path):
    torch.manual_seed(0)
    source = CvT(TINY)
    state = {"module." + k: v for k, v in source.state_dict().items()}
    state["module.head.weight"] = torch.zeros(10, 24)
    path = tmp_path / "cvt.pth"
    torch.save({"state_dict": state}, path)
    loaded = CvT(TINY, pretrained=path)
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    bad = dict(state)
    bad.pop("module.norm.weight")
    torch.save(bad, path)
    with pytest.raises(WeightsError, match="missing"):
        CvT(TINY, pretrained=path)
