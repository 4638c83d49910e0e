import pytest
import torch

from mlic.config import ModelConfig
from mlic.models.backbones import BACKBONES, WeightsError, build_backbone
from mlic.models.classifier import build_model
from mlic.models.heads import HEADS

# Small stand-ins so the sweep runs on a CPU in seconds; the registry is swept whole.
SMALL_HEAD_ARGS = {"query2label": {"hidden_dim": 32, "dim_feedforward": 64, "nheads": 2, "enc_layers": 1,
                                   "dec_layers": 1, "keep_input_proj": True}}
SKIP_BACKBONES = {"cvt_w24"}  # hundreds of millions of parameters; covered by its own test
BACKBONE_NAMES = sorted(set(BACKBONES) - SKIP_BACKBONES) + ["resnet18", "vit_tiny_patch16_224"]


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_backward_every_backbone_head_pair(backbone, head):
    size = 224 if backbone.startswith("vit") else 64
    cfg = ModelConfig(backbone=backbone, head=head, num_classes=7, img_size=size,
                      head_args=SMALL_HEAD_ARGS.get(head, {}))
    model = build_model(cfg)
    x = torch.randn(2, 3, size, size)
    logits = model(x)
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    logits.sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None)]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"


def test_local_weights_load_strictly(tmp_path):
    from safetensors.torch import save_file

    bb = build_backbone("resnet18")
    state = {k: v.clone() + 1 for k, v in bb.body.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)  # an ImageNet classifier
    save_file(state, tmp_path / "r18.safetensors")
    loaded = build_backbone("resnet18", pretrained=tmp_path / "r18.safetensors")
    torch.testing.assert_close(loaded.body.conv1.weight, state["conv1.weight"])
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "r18.pth")
    build_backbone("resnet18", pretrained=tmp_path / "r18.pth")
    with pytest.raises(WeightsError, match="r18.safetensors: weights do not fit"):
        build_backbone("resnet34", pretrained=tmp_path / "r18.safetensors")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pth: not a checkpoint"):
        build_backbone("resnet18", pretrained=tmp_path / "junk.pth")


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown backbone 'resnet9000'"):
        build_backbone("resnet9000")
    with pytest.raises(ValueError, match="unknown head"):
        build_model(ModelConfig(head="nope"))
