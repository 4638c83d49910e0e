"""The CLIP teacher against the official VLPL (HF layout) and AEVLP (OpenAI layout) fixtures, and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mlic.teachers import TEACHERS, build_teacher
from mlic.teachers.clip import TeacherError, aevlp_relation

pytest.importorskip("open_clip", reason="the CLIP teacher needs open_clip (pip install 'mlic[clip]')")

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


@pytest.fixture(scope="module")
def vlpl(official_fixture):
    return official_fixture("vlpl_official.pt")["teacher"]


@pytest.fixture(scope="module")
def aevlp(official_fixture):
    return official_fixture("aevlp_official.pt")["teacher"]


def openai_state(teacher: dict) -> dict:
    """The fixture's fp16 OpenAI state dict with its token embedding rebuilt (fixture's ``rebuild``)."""
    sd = dict(teacher["clip_state_dict"])
    emb = torch.zeros((49408, 128), dtype=torch.float16)
    emb[teacher["token_embedding"]["rows"]] = teacher["token_embedding"]["values"]
    sd["token_embedding.weight"] = emb
    return sd


def gcn_adapter(teacher: dict) -> dict:
    gcn = teacher["gcn"]
    return {"kind": "aevlp_gcn", "weights": gcn["weights"], "relation": gcn["relation_raw"],
            "sparse_topk": gcn["sparse_topk"], "reweight_p": gcn["reweight_p"]}


def aevlp_views(teacher: dict) -> torch.Tensor:
    views = teacher["images"]["views_uint8"]
    return ((views.float().div(255) - IMAGENET_MEAN) / IMAGENET_STD).flatten(0, 1)


def close(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    return bool(((ours - ref).abs() <= 1e-5 * (1 + ref.abs())).all())


def test_registered():
    assert {"clip", "classifier"} <= set(TEACHERS)


def test_vlpl_teacher_hf_layout(vlpl):
    teacher = build_teacher("clip", weights=vlpl["state_dict"], config=vlpl["config"],
                            text_features=vlpl["text_features"])
    assert teacher.image_size == 336 and not any(p.requires_grad for p in teacher.parameters())
    sims = teacher(vlpl["x336"])
    assert sims.dtype == torch.float32 and sims.shape == (3, 12)
    assert (sims - vlpl["sims"]).abs().max() <= 1e-5
    # the official resize of the student's tensor: bilinear, antialiased, 336
    resized = F.interpolate(vlpl["x448"], (336, 336), mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(resized, vlpl["x336"])


def test_vlpl_teacher_ignores_position_ids_and_traps(vlpl):
    sd = dict(vlpl["state_dict"])
    sd["vision_model.embeddings.position_ids"] = torch.arange(577)[None]
    teacher = build_teacher("clip", weights=sd, config=vlpl["config"], text_features=vlpl["text_features"])
    assert (teacher(vlpl["x336"]) - vlpl["sims"]).abs().max() <= 1e-5
    # QuickGELU matters: plain GELU gives other numbers (the trap the reference names)
    gelu = build_teacher("clip", weights=sd, config=vlpl["config"], text_features=vlpl["text_features"],
                         quick_gelu=False)
    assert (gelu(vlpl["x336"]) - vlpl["sims"]).abs().max() > 1e-4
    # and the LayerNorm eps comes from the config
    eps = build_teacher("clip", weights=sd, config={**vlpl["config"], "layer_norm_eps": 1e-6},
                        text_features=vlpl["text_features"])
    assert (eps(vlpl["x336"]) - vlpl["sims"]).abs().max() > 1e-3


def test_aevlp_teacher_openai_layout(aevlp):
    teacher = build_teacher("clip", weights=openai_state(aevlp), class_names=aevlp["class_names"],
                            prompt="a photo of a {}.", text_adapter=gcn_adapter(aevlp))
    teacher.eval()
    assert teacher.prompts == aevlp["prompts"]
    assert torch.equal(teacher.tokens, aevlp["tokenized_prompts"])
    assert torch.equal(aevlp_relation(aevlp["gcn"]["relation_raw"], 9, 0.2), aevlp["gcn"]["gcn_relation"])
    sims = teacher(aevlp_views(aevlp)).view(2, 17, 12)
    assert sims.dtype == torch.float32 and close(sims, aevlp["sims_float32"])
    assert teacher.logit_scale == pytest.approx(torch.tensor(aevlp["logit_scale_raw"]).exp().item())


def test_aevlp_text_tower_and_image_features(aevlp):
    teacher = build_teacher("clip", weights=openai_state(aevlp), class_names=aevlp["class_names"])
    feats = teacher.towers.text(teacher.tokens)
    assert close(feats, aevlp["text_features_clip_float32"])
    emb = teacher.towers.visual(aevlp_views(aevlp)).view(2, 17, 512)
    assert close(emb, aevlp["image_features_float32"])
    # without the adapter: plain CLIP text features (the clean option), normalised
    assert torch.allclose(teacher.text_features, F.normalize(aevlp["text_features_clip_float32"], dim=-1), atol=1e-6)


def test_seeded_gcn_is_reproducible(aevlp):
    spec = {**gcn_adapter(aevlp), "weights": None, "seed": 5}
    one = build_teacher("clip", weights=openai_state(aevlp), class_names=aevlp["class_names"], text_adapter=spec)
    two = build_teacher("clip", weights=openai_state(aevlp), class_names=aevlp["class_names"], text_adapter=spec)
    assert torch.equal(one.text_features, two.text_features)
    bound = 1 / 1024 ** 0.5
    assert one.adapter.w1.abs().max() <= bound and one.adapter.w1.abs().max() > 0.9 * bound


def test_jit_archive_and_files(aevlp, tmp_path):
    from open_clip.model import build_model_from_openai_state_dict

    sd = openai_state(aevlp)
    ref = build_teacher("clip", weights=sd, class_names=aevlp["class_names"])
    x = aevlp_views(aevlp)[:3]
    # a plain state dict file and a wrapped, DDP-prefixed open_clip checkpoint
    torch.save(sd, tmp_path / "state.pt")
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "openclip.pt")
    for path in ("state.pt", "openclip.pt"):
        teacher = build_teacher("clip", weights=tmp_path / path, class_names=aevlp["class_names"])
        assert torch.equal(teacher(x), ref(x))
    # a TorchScript archive (the OpenAI release's form)
    model = build_model_from_openai_state_dict(dict(sd), cast_dtype=None).float().eval()
    traced = torch.jit.trace_module(model, {"encode_image": (torch.zeros(1, 3, 224, 224),)}, check_trace=False)
    traced.save(str(tmp_path / "jit.pt"))
    teacher = build_teacher("clip", weights=tmp_path / "jit.pt", class_names=aevlp["class_names"])
    assert (teacher(x) - ref(x)).abs().max() <= 1e-5


def hf_clip_model(sd: dict) -> tuple[dict, dict]:
    """An HF ``CLIPModel`` state dict + config made from an OpenAI one (the inverse of the teacher's key map)."""
    out: dict = {}

    def tower(src: str, dst: str, layers: int) -> None:
        for i in range(layers):
            s, d = f"{src}transformer.resblocks.{i}.", f"{dst}encoder.layers.{i}."
            for x, w, b in zip("qkv", sd[s + "attn.in_proj_weight"].chunk(3), sd[s + "attn.in_proj_bias"].chunk(3)):
                out[f"{d}self_attn.{x}_proj.weight"], out[f"{d}self_attn.{x}_proj.bias"] = w, b
            pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                     "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
            for a, c in pairs.items():
                out[f"{d}{c}.weight"], out[f"{d}{c}.bias"] = sd[f"{s}{a}.weight"], sd[f"{s}{a}.bias"]

    tower("visual.", "vision_model.", 2)
    tower("", "text_model.", 2)
    v = "vision_model."
    out.update({v + "embeddings.class_embedding": sd["visual.class_embedding"],
                v + "embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
                v + "embeddings.position_embedding.weight": sd["visual.positional_embedding"],
                v + "pre_layrnorm.weight": sd["visual.ln_pre.weight"],
                v + "pre_layrnorm.bias": sd["visual.ln_pre.bias"],
                v + "post_layernorm.weight": sd["visual.ln_post.weight"],
                v + "post_layernorm.bias": sd["visual.ln_post.bias"],
                "visual_projection.weight": sd["visual.proj"].t(),
                "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
                "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
                "text_model.final_layer_norm.weight": sd["ln_final.weight"],
                "text_model.final_layer_norm.bias": sd["ln_final.bias"],
                "text_projection.weight": sd["text_projection"].t(), "logit_scale": sd["logit_scale"]})
    common = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 2,
              "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
    config = {"model_type": "clip", "projection_dim": 512,
              "vision_config": {**common, "patch_size": 16, "image_size": 224, "num_channels": 3},
              "text_config": {**common, "vocab_size": 49408, "max_position_embeddings": 77}}
    return out, config


def test_hf_clipmodel_layout_with_text_tower(aevlp, tmp_path):
    import json

    from safetensors.torch import save_file

    sd = openai_state(aevlp)
    ref = build_teacher("clip", weights=sd, class_names=aevlp["class_names"], text_adapter=gcn_adapter(aevlp))
    hf, config = hf_clip_model(sd)
    x = aevlp_views(aevlp)[:4]
    teacher = build_teacher("clip", weights=hf, config=config, class_names=aevlp["class_names"],
                            text_adapter=gcn_adapter(aevlp))
    assert (teacher(x) - ref(x)).abs().max() <= 1e-5
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in hf.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    teacher = build_teacher("clip", weights=folder, class_names=aevlp["class_names"], text_adapter=gcn_adapter(aevlp))
    assert (teacher(x) - ref(x)).abs().max() <= 1e-5


# ---- bad input: each one clear line ---------------------------------------------------------------------------


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_neither_layout(tmp_path):
    with pytest.raises(TeacherError, match="neither CLIP layout") as err:
        build_teacher("clip", weights={"foo.weight": torch.zeros(2)}, text_features=torch.zeros(2, 2))
    one_line(err)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TeacherError, match="junk.pt") as err:
        build_teacher("clip", weights=tmp_path / "junk.pt", text_features=torch.zeros(2, 2))
    one_line(err)
    with pytest.raises(TeacherError, match="no such file"):
        build_teacher("clip", weights=tmp_path / "absent.pt", text_features=torch.zeros(2, 2))


def test_strict_keys_named(vlpl, aevlp):
    sd = dict(vlpl["state_dict"])
    del sd["vision_model.post_layernorm.bias"]
    sd["vision_model.extra.weight"] = torch.zeros(1)
    sd["vision_model.pre_layrnorm.weight"] = torch.zeros(65)
    with pytest.raises(TeacherError) as err:
        build_teacher("clip", weights=sd, config=vlpl["config"], text_features=vlpl["text_features"])
    message = one_line(err)
    assert "missing vision_model.post_layernorm.bias" in message and "unexpected vision_model.extra.weight" in message
    assert "mis-shaped vision_model.pre_layrnorm.weight (65,) (expected (64,))" in message
    sd = openai_state(aevlp)
    del sd["visual.ln_post.bias"]
    sd["visual.bogus"] = torch.zeros(1)
    with pytest.raises(TeacherError) as err:
        build_teacher("clip", weights=sd, class_names=aevlp["class_names"])
    message = one_line(err)
    assert "missing visual.ln_post.bias" in message and "unexpected visual.bogus" in message
    with pytest.raises(TeacherError, match="config"):
        build_teacher("clip", weights=vlpl["state_dict"], text_features=vlpl["text_features"])


def test_text_tower_missing(vlpl, aevlp):
    with pytest.raises(TeacherError, match="no text tower.*text_features") as err:
        build_teacher("clip", weights=vlpl["state_dict"], config=vlpl["config"], class_names=["a", "b"])
    one_line(err)
    vision_only = {k: v for k, v in openai_state(aevlp).items() if k.startswith("visual.")}
    with pytest.raises(TeacherError, match="no text tower"):
        build_teacher("clip", weights=vision_only, class_names=aevlp["class_names"])
    teacher = build_teacher("clip", weights=vision_only, text_features=torch.randn(3, 512))
    assert teacher(aevlp_views(aevlp)[:2]).shape == (2, 3)
    with pytest.raises(TeacherError, match="class_names .* or text_features"):
        build_teacher("clip", weights=vision_only)


def test_text_features_wrong_shape(vlpl):
    with pytest.raises(TeacherError, match=r"\(12, 31\).*expected \(K, 32\)") as err:
        build_teacher("clip", weights=vlpl["state_dict"], config=vlpl["config"], text_features=torch.zeros(12, 31))
    one_line(err)
    with pytest.raises(TeacherError, match="11 rows but there are 12 classes") as err:
        build_teacher("clip", weights=vlpl["state_dict"], config=vlpl["config"], text_features=torch.zeros(11, 32),
                      class_names=[f"c{i}" for i in range(12)])
    one_line(err)


def test_class_name_beyond_context(aevlp):
    names = list(aevlp["class_names"])
    names[3] = "very " * 80 + "long dog"
    with pytest.raises(TeacherError, match="class 'very very") as err:
        build_teacher("clip", weights=openai_state(aevlp), class_names=names)
    assert "context length 77" in one_line(err)


def test_bad_adapter_and_input(aevlp, vlpl):
    with pytest.raises(TeacherError, match="gc2.weight has shape"):
        bad = {**gcn_adapter(aevlp), "weights": {**aevlp["gcn"]["weights"], "gc2.weight": torch.zeros(3, 3)}}
        build_teacher("clip", weights=openai_state(aevlp), class_names=aevlp["class_names"], text_adapter=bad)
    with pytest.raises(TeacherError, match="kind"):
        build_teacher("clip", weights=openai_state(aevlp), class_names=aevlp["class_names"],
                      text_adapter={"kind": "other"})
    teacher = build_teacher("clip", weights=vlpl["state_dict"], config=vlpl["config"],
                            text_features=vlpl["text_features"])
    with pytest.raises(TeacherError, match="336x336"):
        teacher(torch.zeros(1, 3, 224, 224))
