"""--pretrained as a local file, `timm` and `hf-hub:ORG/NAME[@REVISION]`, against a Hugging Face cache in tmp_path.

No test touches the network: every socket connection or name lookup fails the test (``hub`` fixture).
"""

from __future__ import annotations

import hashlib
import io
import socket

import pytest
import timm
import torch
from huggingface_hub import try_to_load_from_cache
from safetensors.torch import save

from mlic.config import ModelConfig
from mlic.models.backbones import build_backbone, resolve_pretrained
from mlic.models.classifier import build_model
from mlic.models.weights import PretrainedWeights, WeightsError, hub_settings

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache under HF_HOME, HF_HUB_OFFLINE=1, and no network; gives the cache folder."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError(f"a test tried to reach the network: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    return cache


def put_in_cache(cache, repo_id: str, filename: str, data: bytes, commit: str = COMMIT, ref: str = "main"):
    """Store a file as huggingface_hub does: blobs/<sha256>, refs/<ref> -> commit, snapshots/<commit>/<file> -> blob."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    sha = hashlib.sha256(data).hexdigest()
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "blobs" / sha).write_bytes(data)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot / filename).symlink_to(f"../../blobs/{sha}")
    assert try_to_load_from_cache(repo_id, filename, cache_dir=cache, revision=ref) == str(snapshot / filename)
    return sha


def timm_state(name: str, **kwargs) -> dict[str, torch.Tensor]:
    """A full timm model's weights (classifier included), shifted off any default initialisation."""
    torch.manual_seed(0)
    state = timm.create_model(name, **kwargs).state_dict()
    return {k: v + 0.5 if v.is_floating_point() else v for k, v in state.items()}


def assert_loaded(body: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = body.state_dict()
    assert own, "empty body"
    for k, v in own.items():
        torch.testing.assert_close(v, state[k], msg=k)


def test_timm_loads_the_cached_default_weights(hub):
    state = timm_state("test_resnet")
    data = save(state)
    sha = put_in_cache(hub, "timm/test_resnet.r160_in1k", "model.safetensors", data)

    weights = resolve_pretrained("timm", "test_resnet")  # a bare name means timm's default tag
    assert weights.sha256 == sha == hashlib.sha256(data).hexdigest()
    assert weights.source == f"timm:test_resnet.r160_in1k (hf-hub:timm/test_resnet.r160_in1k@{COMMIT})"
    assert weights.path.is_file() and hub in weights.path.parents

    assert_loaded(build_backbone("test_resnet.r160_in1k", pretrained="timm").body, state)
    model = build_model(ModelConfig(backbone="test_resnet.r160_in1k", num_classes=3), pretrained=weights)
    assert_loaded(model.backbone.body, state)
    assert "fc.weight" in state and "fc.weight" not in model.backbone.body.state_dict()  # the classifier is dropped


def test_hf_hub_loads_a_repository_at_a_revision(hub):
    main_state, v1_state = timm_state("test_resnet"), timm_state("test_resnet", num_classes=5)
    put_in_cache(hub, "someorg/my-resnet", "model.safetensors", save(main_state))
    buffer = io.BytesIO()
    torch.save({"state_dict": v1_state}, buffer)  # a torch file, as pytorch_model.bin
    v1_commit = "f" * 40
    v1_sha = put_in_cache(hub, "someorg/my-resnet", "pytorch_model.bin", buffer.getvalue(), commit=v1_commit, ref="v1")

    weights = resolve_pretrained("hf-hub:someorg/my-resnet", "test_resnet")
    assert weights.source == f"hf-hub:someorg/my-resnet@{COMMIT}"
    assert_loaded(build_backbone("test_resnet", pretrained=weights).body, main_state)

    weights = resolve_pretrained("hf-hub:someorg/my-resnet@v1", "test_resnet")
    assert (weights.source, weights.sha256) == (f"hf-hub:someorg/my-resnet@{v1_commit}", v1_sha)
    assert weights.path.name == "pytorch_model.bin"
    assert_loaded(build_backbone("test_resnet", pretrained=f"hf-hub:someorg/my-resnet@{v1_commit}").body, v1_state)


def test_hf_hub_serves_in_house_backbones_and_timm_refuses_them(hub):
    torch.manual_seed(0)
    state = {k: v + 1 if v.is_floating_point() else v for k, v in build_backbone("digitnet").state_dict().items()}
    put_in_cache(hub, "someorg/digitnet", "model.safetensors", save(state))
    assert_loaded(build_backbone("digitnet", pretrained="hf-hub:someorg/digitnet"), state)
    with pytest.raises(WeightsError, match=r"^--pretrained timm: 'digitnet' is an in-house backbone.*hf-hub:ORG/NAME"):
        build_backbone("digitnet", pretrained="timm")


def test_timms_checkpoint_filter_applies(hub):
    """test_vit's 160-px weights into a 96-px model: timm's filter resamples pos_embed; the rest loads as stored."""
    state = timm_state("test_vit")
    put_in_cache(hub, "timm/test_vit.r160_in1k", "model.safetensors", save(state))
    body = build_backbone("test_vit", pretrained="timm", img_size=96).body
    assert state["pos_embed"].shape == (1, 101, 64) and body.pos_embed.shape == (1, 37, 64)
    torch.testing.assert_close(body.pos_embed[:, 0], state["pos_embed"][:, 0])  # the class token's, not resampled
    assert_loaded(body, {**state, "pos_embed": body.pos_embed.detach()})


def test_local_files_record_their_path_and_hash(tmp_path):
    torch.manual_seed(0)
    body = timm.create_model("test_resnet", num_classes=0, global_pool="")
    state = {k: v + 0.5 if v.is_floating_point() else v for k, v in body.state_dict().items()}  # headless
    data = save(state)
    (tmp_path / "w.safetensors").write_bytes(data)
    weights = resolve_pretrained(str(tmp_path / "w.safetensors"), "test_resnet")
    assert weights == PretrainedWeights(tmp_path / "w.safetensors", f"file:{tmp_path / 'w.safetensors'}",
                                        hashlib.sha256(data).hexdigest())
    assert_loaded(build_backbone("test_resnet", pretrained=weights).body, state)
    with pytest.raises(WeightsError, match=r"w.safetensors: weights do not fit backbone test_vit; check --backbone \("):
        build_backbone("test_vit", pretrained=tmp_path / "w.safetensors")


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_offline_and_not_cached_says_what_to_download(hub):
    with pytest.raises(WeightsError) as e:
        resolve_pretrained("timm", "test_resnet.r160_in1k")
    message = one_line(e)
    assert message.startswith("test_resnet.r160_in1k: pretrained weights not in the Hugging Face cache")
    for part in (str(hub), "HF_HUB_OFFLINE=1", "`hf download timm/test_resnet.r160_in1k model.safetensors`",
                 "--pretrained FILE"):
        assert part in message
    with pytest.raises(WeightsError) as e:
        build_backbone("test_resnet", pretrained="hf-hub:someorg/does-not-exist@v2")
    message = one_line(e)
    assert message.startswith("hf-hub:someorg/does-not-exist@v2: pretrained weights not in the Hugging Face cache")
    assert "no models--someorg--does-not-exist there: check the name" in message
    assert "--revision v2" in message


@pytest.mark.parametrize(("spec", "backbone", "expected"), [
    ("nope", "resnet18", r"^--pretrained 'nope': neither an existing file, `timm` nor `hf-hub:ORG/NAME\[@REVISION\]`;"
                         r" pass a weight file \(.safetensors or torch\), `timm` \(resnet18's timm weights\) or hf"),
    ("nope", "digitnet", r"pass a weight file \(.safetensors or torch\) or hf-hub:ORG/NAME$"),
    ("missing.pth", "resnet18", r"^missing.pth: weight file not found$"),
    ("hf-hub:no-slash", "resnet18", r"^--pretrained hf-hub:no-slash: expected hf-hub:ORG/NAME or hf-hub:ORG/NAME@REV"),
    ("hf-hub:a/b@", "resnet18", r"expected hf-hub:ORG/NAME"),
    ("timm", "resnet50_mlp", r"^resnet50_mlp.untrained: timm has no pretrained weights for this model; pass "),
    ("timm", "vit_huge_patch14_gap_224", r"only at https://dl.fbaipublicfiles.com/.*; download that file and pass "),
    ("timm", "tresnet_v2_xl", r"'tresnet_v2_xl' is an in-house backbone"),
    ("timm", "resnet18.nosuchtag", r"^unknown backbone 'resnet18.nosuchtag': Invalid pretrained tag"),
])
def test_bad_specs_give_one_line(hub, spec, backbone, expected):
    with pytest.raises(ValueError, match=expected) as e:
        resolve_pretrained(spec, backbone)
    one_line(e)


def test_damaged_cache_file_is_refused(hub):
    sha = put_in_cache(hub, "timm/test_resnet.r160_in1k", "model.safetensors", save(timm_state("test_resnet")))
    (hub / "models--timm--test_resnet.r160_in1k" / "blobs" / sha).write_bytes(b"truncated")
    with pytest.raises(WeightsError, match=r"is damaged .*download it again$"):
        resolve_pretrained("timm", "test_resnet")


def test_hub_settings_follow_the_environment_at_call_time(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as if imported without HF_HUB_OFFLINE
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_settings() == (tmp_path / "home" / "hub", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_settings() == (tmp_path / "elsewhere", True)
