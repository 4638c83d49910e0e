"""ML-Decoder head: conformance with the official MLDecoder (fixture), key layout, sizes, quirks, bad weights."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from mlic.models.heads import HEADS, HeadWeightsError
from mlic.models.ml_decoder import MLDecoderHead, ml_decoder_sizes

FIXTURE = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "ml_decoder_official.pt"


@pytest.fixture(scope="module")
def fixture():
    if not FIXTURE.is_file():
        pytest.skip(f"conformance fixture not found at {FIXTURE} (shared/ is not part of the repo)")
    return torch.load(FIXTURE, weights_only=False)  # our own trusted file


def fixture_head(fixture, name="coco80_full", dtype=torch.float64, **options) -> MLDecoderHead:
    case = fixture["meta"]["cases"][name]
    head = HEADS["ml_decoder"](case["initial_num_features"], case["num_classes"], num_of_groups=case["num_of_groups"],
                               decoder_embedding=case["decoder_embedding"], **options)
    head = head.to(dtype).eval()
    head.load_state_dict(fixture["state_dict"][name], strict=True)
    return head


def test_fixture_float64(fixture):
    head = fixture_head(fixture)
    features = fixture["inputs"]["coco80_full"]["features"].double()
    expected = fixture["results"]["coco80_full"]
    with torch.no_grad():
        memory, hidden = head.forward_decoder(features)
        logits = head(features)
    assert logits.shape == (2, 80) and logits.dtype == torch.float64
    assert (memory - expected["memory"]).abs().max().item() <= 1e-10
    assert (hidden - expected["decoder_output"]).abs().max().item() <= 1e-10
    diff = (logits - expected["logits"]).abs().max().item()
    assert diff <= 1e-10, f"float64 logits differ from the official by {diff:.3g}"


def test_fixture_float32(fixture):
    head = fixture_head(fixture, dtype=torch.float32)
    with torch.no_grad():
        logits = head(fixture["inputs"]["coco80_full"]["features"].float())
    assert (logits - fixture["results"]["coco80_full"]["logits_float32"]).abs().max().item() <= 1e-4


def test_query_doubling_is_the_default_and_matters(fixture):
    features = fixture["inputs"]["coco80_full"]["features"].double()
    expected = fixture["results"]["coco80_full"]["logits"]
    with torch.no_grad():
        fixed = fixture_head(fixture, double_query=False)(features)
    # LN1(Q) instead of LN1(2Q): differs only through LayerNorm's eps, yet far above float64 noise
    assert 1e-9 < (fixed - expected).abs().max().item() < 1e-3


def test_token_order_and_3d_input(fixture):
    head = fixture_head(fixture)
    features = fixture["inputs"]["coco80_full"]["features"].double()
    with torch.no_grad():
        logits = head(features)
        tokens = features.flatten(2).transpose(1, 2)
        torch.testing.assert_close(head(tokens), logits, atol=0, rtol=0)
        shuffled = tokens[:, torch.randperm(tokens.shape[1])]  # no positional encoding: order is irrelevant
        torch.testing.assert_close(head(shuffled), logits, atol=1e-12, rtol=0)


def test_official_key_layouts(fixture):
    layouts = fixture["meta"]["key_layouts"]
    layouts = ast.literal_eval(layouts) if isinstance(layouts, str) else layouts
    for name, layout in layouts.items():
        cfg = layout["config"]
        with torch.device("meta"):
            head = MLDecoderHead(cfg["initial_num_features"], cfg["num_classes"], cfg["num_of_groups"],
                                 cfg["decoder_embedding"])
        ours = [(k, tuple(v.shape)) for k, v in head.state_dict().items()]
        assert ours == [(k, tuple(s)) for k, s in layout["keys"]], name
    frozen = [n for n, p in head.named_parameters() if not p.requires_grad]
    assert frozen == ["decoder.query_embed.weight"]


@pytest.mark.parametrize("k,groups,expected", [
    (80, -1, (80, 768, 1)), (130, -1, (100, 768, 2)), (9605, 200, (200, 768, 49)), (9605, -1, (100, 768, 97)),
    (196, -1, (100, 768, 2)), (5, 50, (5, 768, 1)), (2001, 2000, (2000, 768, 2)),  # the official int(x+0.999) gives 1
])
def test_sizes(k, groups, expected):
    assert ml_decoder_sizes(k, groups) == expected


def test_group_fc_reads_class_k_from_query_k_div_dup():
    torch.manual_seed(0)
    head = MLDecoderHead(8, 7, num_of_groups=3, decoder_embedding=16, nheads=2, dim_feedforward=32).eval()
    assert (head.num_groups, head.duplicate_factor) == (3, 3)
    features = torch.randn(2, 8, 3, 4)
    with torch.no_grad():
        _, hidden = head.forward_decoder(features)
        logits = head(features)
    pooling, bias = head.decoder.duplicate_pooling, head.decoder.duplicate_pooling_bias
    for k in range(7):
        g, j = divmod(k, 3)
        torch.testing.assert_close(logits[:, k], hidden[:, g] @ pooling[g, :, j] + bias[k])


def test_weights_of_another_class_count_are_one_clear_error():
    small = MLDecoderHead(16, 80, decoder_embedding=16, nheads=2, dim_feedforward=32)
    other = MLDecoderHead(16, 20, decoder_embedding=16, nheads=2, dim_feedforward=32)
    with pytest.raises(HeadWeightsError, match=r"has shape \(80,\) but this head has \(20,\); build the head with "
                                               r"num_classes=80") as info:
        other.load_state_dict(small.state_dict())
    assert "\n" not in str(info.value)
    model = torch.nn.Sequential(MLDecoderHead(16, 9, num_of_groups=3, decoder_embedding=16, nheads=2))
    with pytest.raises(HeadWeightsError, match=r"0\.decoder\.query_embed\.weight.*num_of_groups=9"):
        model.load_state_dict(torch.nn.Sequential(MLDecoderHead(16, 9, decoder_embedding=16, nheads=2)).state_dict())
    with pytest.raises(ValueError, match="divisible"):
        MLDecoderHead(16, 9, decoder_embedding=20)


def test_cost_grows_linearly_with_classes_only_in_the_group_fc():
    """9,605 classes (OpenImages): with at most 100 queries only the group FC grows, by 2·B·D FLOPs per column."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 64, 3, 3)
    counts, per_class = {}, {}
    for k in (80, 1000, 9605):
        for groups, store in ((-1, counts), (k, per_class)):
            head = MLDecoderHead(64, k, num_of_groups=groups, decoder_embedding=32, dim_feedforward=64).eval()
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                assert head(x).shape == (2, k)
            store[k] = (counter.get_total_flops(), head.num_groups * head.duplicate_factor)
    (f1000, cols1000), (f9605, cols9605) = counts[1000], counts[9605]
    assert cols9605 == 9700 and f9605 - f1000 == 2 * 2 * 32 * (cols9605 - cols1000)
    assert per_class[9605][0] > 30 * f9605  # one query per class: the whole decoder layer grows with K
