"""View makers against the official fixtures: AEVLP's global view + tiles from the raw image (bit-exact), VLPL's
resize of the student's tensor, and the whole AEVLP chain raw image -> views -> teacher -> rule."""

from __future__ import annotations

import pytest
import torch

from mlic.teachers import build_teacher, pseudo_labels
from mlic.teachers.views import clip_view, grid_views, make_views, resize_view, tile_boxes

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


@pytest.fixture(scope="module")
def aevlp(official_fixture):
    return official_fixture("aevlp_official.pt")


def raw_chw(raw: torch.Tensor) -> torch.Tensor:
    return raw.permute(2, 0, 1).contiguous() if raw.shape[-1] == 3 else raw


def test_aevlp_views_bit_exact(aevlp):
    images = aevlp["teacher"]["images"]
    for i, raw in enumerate(images["raw_uint8"]):
        w, h = images["sizes_wh"][i]
        assert tile_boxes(w, h, 4) == [tuple(b) for b in images["tile_boxes_ltrb"][i][1:]]
        views = grid_views(raw_chw(raw), grid=4, size=224)
        views = torch.where(images["flipped"][i].view(-1, 1, 1, 1), views.flip(-1), views)  # the official draws
        reference = (images["views_uint8"][i].float().div(255) - IMAGENET_MEAN) / IMAGENET_STD
        assert torch.equal(views, reference)


def test_aevlp_chain_from_raw_images(aevlp):
    pytest.importorskip("open_clip", reason="the CLIP teacher needs open_clip (pip install 'mlic[clip]')")
    t = aevlp["teacher"]
    state = dict(t["clip_state_dict"])
    state["token_embedding.weight"] = torch.zeros((49408, 128), dtype=torch.float16)
    state["token_embedding.weight"][t["token_embedding"]["rows"]] = t["token_embedding"]["values"]
    gcn = t["gcn"]
    adapter = {"kind": "aevlp_gcn", "weights": gcn["weights"], "relation": gcn["relation_raw"],
               "sparse_topk": gcn["sparse_topk"], "reweight_p": gcn["reweight_p"]}
    teacher = build_teacher("clip", weights=state, class_names=t["class_names"], text_adapter=adapter)
    views = torch.stack([grid_views(raw_chw(r), 4, 224) for r in t["images"]["raw_uint8"]])
    views = torch.where(t["images"]["flipped"].view(2, 17, 1, 1, 1), views.flip(-1), views)
    sims = teacher(views.flatten(0, 1)).view(2, 17, -1)
    case = aevlp["pseudo_label_cases"]["teacher_chain"]
    hp = case["hp"]
    pl = pseudo_labels("aevlp", sims, case["targets"], temperature=hp["temp"], eta=hp["eta"], top_k=hp["top_k"],
                       threshold=hp["threshold"], negative_ratio=hp["negative_ratio"])
    assert torch.equal(pl, case["pseudo_labels"])


def test_flip_draws_and_other_views():
    img = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    flipped = grid_views(img, 2, 32, flip=True, generator=gen)
    plain = grid_views(img, 2, 32)
    assert flipped.shape == (5, 3, 32, 32)
    assert all(torch.equal(f, p) or torch.equal(f, p.flip(-1)) for f, p in zip(flipped, plain))
    assert clip_view(img, 32).shape == (3, 32, 32)
    assert resize_view(torch.randn(2, 3, 448, 448), 336).shape == (2, 3, 336, 336)
    assert make_views("vlpl", img, 24, student_size=48).shape == (1, 3, 24, 24)
    with pytest.raises(ValueError, match="teacher_input"):
        make_views("other", img, 24)
