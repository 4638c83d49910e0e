"""Heads: Query2Label against a plain nn.MultiheadAttention reference, BoostLU against its official fixture,
position encoding, gradients of every registered head."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mlic.models.heads import (
    HEADS,
    BoostLUHead,
    GroupWiseLinear,
    HeadWeightsError,
    MultiheadAttention,
    Query2LabelHead,
    sine_position_encoding,
)

BOOSTLU_FIXTURE = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "boostlu_official.pt"


def detr_sine(h: int, w: int, npf: int) -> torch.Tensor:
    """DETR's PositionEmbeddingSine(normalize=True) on an all-valid mask, written the way DETR writes it."""
    not_mask = torch.ones(1, h, w)
    y_embed = not_mask.cumsum(1, dtype=torch.float32)
    x_embed = not_mask.cumsum(2, dtype=torch.float32)
    eps, scale = 1e-6, 2 * math.pi
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(npf, dtype=torch.float32)
    dim_t = 10000 ** (2 * (dim_t // 2) / npf)
    pos_x = x_embed[:, :, :, None] / dim_t
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # (1, 2*npf, h, w)


@pytest.mark.parametrize("h,w,d", [(7, 7, 256), (14, 14, 64), (5, 9, 32), (1, 3, 8)])
def test_sine_encoding_matches_detr(h, w, d):
    ours = sine_position_encoding(h, w, d)
    assert ours.shape == (h * w, d)
    ref = detr_sine(h, w, d // 2)[0].flatten(1).T
    assert torch.equal(ours, ref)


def test_sine_encoding_dtype_and_odd_dim():
    assert sine_position_encoding(3, 4, 16, dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError):
        sine_position_encoding(3, 3, 15)


def test_attention_matches_nn_multihead_attention():
    torch.manual_seed(0)
    d, heads = 32, 4
    ours = MultiheadAttention(d, heads).eval()
    ref = nn.MultiheadAttention(d, heads).eval()
    ref.load_state_dict(ours.state_dict())
    q, k = torch.randn(3, 5, d), torch.randn(3, 11, d)
    v = torch.randn(3, 11, d)
    out, weights = ours(q, k, v, need_weights=True)
    out_fast, none = ours(q, k, v)
    ref_out, ref_w = ref(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
    assert none is None
    torch.testing.assert_close(out, ref_out.transpose(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_fast, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, ref_w, atol=1e-6, rtol=1e-5)
    same, _ = ours(q, q, v[:, :5])  # the packed q/k projection path
    ref_same, _ = ref(q.transpose(0, 1), q.transpose(0, 1), v[:, :5].transpose(0, 1))
    torch.testing.assert_close(same, ref_same.transpose(0, 1), atol=1e-5, rtol=1e-5)


def reference_q2l(head: Query2LabelHead, features: torch.Tensor) -> torch.Tensor:
    """The official forward spelled out with seq-first nn.MultiheadAttention and a (1, d, h, w) encoding."""
    x = head.input_proj(features)
    b, d, h, w = x.shape
    pos = detr_sine(h, w, d // 2).to(x.dtype).flatten(2).permute(2, 0, 1)  # (hw, 1, d)
    src = x.flatten(2).permute(2, 0, 1)

    def mha(module: MultiheadAttention, q, k, v):
        ref = nn.MultiheadAttention(d, module.num_heads).to(x.dtype).eval()
        ref.load_state_dict(module.state_dict())
        return ref(q, k, v)[0]

    for layer in head.encoder.layers:
        q = src + pos
        src = layer.norm1(src + mha(layer.self_attn, q, q, src))
        src = layer.norm2(src + layer.linear2(F.relu(layer.linear1(src))))
    query_pos = head.query_embed.weight.unsqueeze(1).repeat(1, b, 1)
    tgt = torch.zeros_like(query_pos)
    for layer in head.decoder.layers:
        if layer.self_attn is not None:
            q = tgt + query_pos
            tgt = layer.norm1(tgt + mha(layer.self_attn, q, q, tgt))
        tgt = layer.norm2(tgt + mha(layer.multihead_attn, tgt + query_pos, src + pos, src))
        tgt = layer.norm3(tgt + layer.linear2(F.relu(layer.linear1(tgt))))
    hs = head.decoder.norm(tgt).transpose(0, 1)  # (B, K, d)
    return (head.fc.W * hs).sum(-1) + head.fc.b


@pytest.mark.parametrize("self_attn", [False, True])
def test_query2label_matches_reference(self_attn):
    torch.manual_seed(1)
    head = Query2LabelHead(24, 7, hidden_dim=32, dim_feedforward=48, enc_layers=2, dec_layers=2, nheads=4,
                           decoder_self_attn=self_attn, first_decoder_self_attn=self_attn).eval().double()
    features = torch.randn(2, 24, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        logits = head(features)
        ref = reference_q2l(head, features)
        logits_attn, maps = head(features, return_attention=True)
    assert logits.shape == (2, 7)
    torch.testing.assert_close(logits, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(logits_attn, logits, atol=1e-10, rtol=0)
    assert maps.shape == (2, 7, 5, 6)
    torch.testing.assert_close(maps.sum(dim=(2, 3)), torch.ones(2, 7, dtype=torch.float64))


def test_query2label_layout_and_options():
    head = Query2LabelHead(16, 5, hidden_dim=16, nheads=2)
    names = set(head.state_dict())
    assert isinstance(head.input_proj, nn.Identity)
    assert "decoder.layers.0.self_attn.in_proj_weight" not in names and "decoder.layers.0.norm1.weight" not in names
    assert {"query_embed.weight", "fc.W", "fc.b", "decoder.norm.weight",
            "encoder.layers.0.self_attn.in_proj_weight"} <= names
    assert head.fc.W.shape == (1, 5, 16) and head.fc.b.shape == (1, 5)
    assert head.encoder.layers[0].linear1.out_features == 64  # default feed-forward 4·d
    kept = Query2LabelHead(16, 5, nheads=2, decoder_self_attn=True)
    assert "decoder.layers.1.self_attn.in_proj_weight" in kept.state_dict()
    assert "decoder.layers.0.self_attn.in_proj_weight" in kept.state_dict()
    first_only = Query2LabelHead(16, 5, nheads=2, first_decoder_self_attn=True)
    assert "decoder.layers.0.norm1.weight" in first_only.state_dict()
    assert "decoder.layers.1.norm1.weight" not in first_only.state_dict()
    proj = Query2LabelHead(16, 5, hidden_dim=8, nheads=2)
    assert isinstance(proj.input_proj, nn.Conv2d) and proj.input_proj.out_channels == 8
    with pytest.raises(ValueError, match="keep_input_proj"):
        Query2LabelHead(16, 5, hidden_dim=8, nheads=2, keep_input_proj=False)
    with pytest.raises(ValueError, match="divisible"):
        Query2LabelHead(16, 5, hidden_dim=18, nheads=4)


# small settings per head; every registered head must be listed (checked below)
BACKWARD_ARGS = {
    "linear": {},
    "query2label": {"hidden_dim": 16, "nheads": 2, "dim_feedforward": 32},
    "ml_decoder": {"decoder_embedding": 16, "nheads": 2, "dim_feedforward": 32, "num_of_groups": 4},
    "boostlu": {"alpha": 5.0},
}


def test_backward_covers_every_head():
    assert set(BACKWARD_ARGS) == set(HEADS)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_heads_backward(name):
    torch.manual_seed(0)
    head = HEADS[name](12, 6, **BACKWARD_ARGS[name]).train()
    logits = head(torch.randn(3, 12, 4, 5))
    assert logits.shape == (3, 6) and torch.isfinite(logits).all()
    logits.sum().backward()
    trainable = [(n, p) for n, p in head.named_parameters() if p.requires_grad]
    assert trainable
    for pname, p in trainable:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname
    for pname, p in head.named_parameters():  # frozen by design (ML-Decoder's random queries)
        assert p.requires_grad or p.grad is None, pname


@pytest.fixture(scope="module")
def boostlu_fixture():
    if not BOOSTLU_FIXTURE.is_file():
        pytest.skip(f"conformance fixture not found at {BOOSTLU_FIXTURE} (shared/ is not part of the repo)")
    return torch.load(BOOSTLU_FIXTURE, weights_only=False)  # our own trusted file


def boostlu_head(fixture, alpha: float, dtype=torch.float64) -> BoostLUHead:
    inputs = fixture["inputs"]
    weight = inputs["onebyone_conv.weight"]
    head = HEADS["boostlu"](weight.shape[1], weight.shape[0], alpha=alpha).to(dtype)
    head.load_state_dict({"fc.weight": weight[:, :, 0, 0], "fc.bias": inputs["onebyone_conv.bias"]}, strict=True)
    return head


@pytest.mark.parametrize("alpha", [5.0, 2.0, 1.0])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_boostlu_matches_official(boostlu_fixture, alpha, mode):
    inputs = boostlu_fixture["inputs"]
    expected = boostlu_fixture["results"][f"alpha_{alpha:g}"]
    head = boostlu_head(boostlu_fixture, alpha).train(mode == "train")
    features = inputs["features_f64"].clone().requires_grad_(True)
    logits = head(features)
    (logits * inputs["upstream_grad"]).sum().backward()
    assert logits.dtype == torch.float64
    checks = {
        "logits": (logits, expected[f"logits_{mode}"]),
        "cam": (head.class_activation(inputs["features_f64"]), expected["cam_before_boost"]),
        "grad features": (features.grad, expected[f"grad_features_{mode}"]),
        "grad weight": (head.fc.weight.grad, expected[f"grad_weight_{mode}"][:, :, 0, 0]),
        "grad bias": (head.fc.bias.grad, expected[f"grad_bias_{mode}"]),
    }
    for what, (ours, theirs) in checks.items():
        diff = (ours - theirs).abs().max().item()
        assert diff <= 1e-8, f"{what} differs from the official by {diff:.3g}"
    head32 = boostlu_head(boostlu_fixture, alpha, torch.float32).eval()
    with torch.no_grad():
        diff32 = (head32(inputs["features_f32"]) - expected["logits_eval_float32"]).abs().max().item()
    assert diff32 <= 1e-5


def test_boostlu_alpha_one_is_the_linear_head(boostlu_fixture):
    head = boostlu_head(boostlu_fixture, 1.0)
    with torch.no_grad():
        logits = head(boostlu_fixture["inputs"]["features_f64"])
    assert (logits - boostlu_fixture["ll_linear_head_logits"]).abs().max().item() <= 1e-12
    linear = HEADS["linear"](head.fc.in_features, head.fc.out_features).double()
    linear.load_state_dict(head.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(linear(boostlu_fixture["inputs"]["features_f64"]), logits, atol=1e-12, rtol=0)


def test_boostlu_zero_activation_gets_the_unboosted_gradient():
    head = BoostLUHead(2, 1, alpha=5.0).double()
    with torch.no_grad():
        head.fc.weight.copy_(torch.tensor([[1.0, 0.0]]))
        head.fc.bias.zero_()
    features = torch.tensor([[[[2.0, 0.0, -1.0]], [[0.0, 0.0, 0.0]]]], dtype=torch.float64, requires_grad=True)
    logits = head(features)
    assert logits.item() == pytest.approx((5 * 2.0 + 0.0 - 1.0) / 3)
    logits.sum().backward()
    torch.testing.assert_close(features.grad[0, 0, 0], torch.tensor([5.0, 1.0, 1.0], dtype=torch.float64) / 3)


def test_boostlu_bad_input():
    head = BoostLUHead(8, 3)
    with pytest.raises(ValueError, match="needs feature maps"):
        head(torch.randn(2, 8))
    with pytest.raises(HeadWeightsError, match=r"fc.bias has shape \(5,\).*num_classes=5"):
        head.load_state_dict(BoostLUHead(8, 5).state_dict())
    assert "alpha" not in "".join(head.state_dict())  # a plain setting, as in the official code


def test_any_input_size_and_autocast():
    head = Query2LabelHead(8, 3, hidden_dim=8, nheads=2).eval()
    with torch.no_grad():
        for h, w in [(1, 1), (3, 7), (9, 4)]:
            assert head(torch.randn(2, 8, h, w)).shape == (2, 3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, maps = head(torch.randn(2, 8, 4, 4), return_attention=True)
    assert out.shape == (2, 3) and maps.shape == (2, 3, 4, 4)


def test_group_wise_linear():
    fc = GroupWiseLinear(4, 3)
    x = torch.randn(2, 4, 3)
    expected = torch.einsum("bkd,kd->bk", x, fc.W[0]) + fc.b
    torch.testing.assert_close(fc(x), expected)
