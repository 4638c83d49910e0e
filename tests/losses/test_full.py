import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from mlic.losses import LOSSES, build_loss


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(-1, 2, (6, 5), generator=g).to(torch.int8)
    return logits, targets


def test_bce_matches_torch_on_known_entries(batch):
    logits, targets = batch
    known = targets >= 0
    expected = F.binary_cross_entropy_with_logits(logits[known], targets[known].double())
    torch.testing.assert_close(build_loss("bce")(logits, targets), expected)


def test_bce_with_eps_is_cole_formula(batch):
    logits, targets = batch
    full = targets.clamp(min=0)
    p = torch.sigmoid(logits)
    expected = -(full * torch.log(p + 1e-5) + (1 - full) * torch.log(1 - p + 1e-5)).mean()
    torch.testing.assert_close(build_loss("bce", eps=1e-5)(logits, full), expected)


def test_focal_matches_torchvision(batch):
    logits, targets = batch
    full = targets.clamp(min=0).double()
    expected = sigmoid_focal_loss(logits, full, alpha=0.25, gamma=2.0, reduction="mean")
    torch.testing.assert_close(build_loss("focal", alpha=0.25, gamma=2.0)(logits, full.to(torch.int8)), expected)


def test_asl_hand_computed():
    logits = torch.tensor([[2.0, -1.0]], dtype=torch.float64)
    targets = torch.tensor([[1, 0]], dtype=torch.int8)
    p = torch.sigmoid(logits)
    pos = -torch.log(p[0, 0]) * (1 - p[0, 0]) ** 1
    p_m = (p[0, 1] - 0.05).clamp(min=0)
    neg = -torch.log(1 - p_m) * p_m**4
    loss = build_loss("asl", gamma_neg=4, gamma_pos=1, clip=0.05)(logits, targets)
    torch.testing.assert_close(loss, (pos + neg) / 2)


def test_asl_with_zero_gammas_is_bce(batch):
    logits, targets = batch
    asl = build_loss("asl", gamma_neg=0, gamma_pos=0, clip=0, eps=1e-300)(logits, targets)
    torch.testing.assert_close(asl, build_loss("bce")(logits, targets))


def test_asl_scale(batch):
    logits, targets = batch
    a = build_loss("asl", gamma_neg=2, gamma_pos=0, clip=0, eps=1e-5)(logits, targets)
    b = build_loss("asl", gamma_neg=2, gamma_pos=0, clip=0, eps=1e-5, scale=1000)(logits, targets)
    torch.testing.assert_close(b, a * 1000)


@pytest.mark.parametrize("name", ["bce", "focal", "asl", "bce_ls"])
def test_unknown_entries_get_no_gradient(name, batch):
    logits, targets = batch
    logits = logits.clone().requires_grad_(True)
    build_loss(name)(logits, targets).backward()
    assert torch.all(logits.grad[targets == -1] == 0)
    assert torch.any(logits.grad[targets >= 0] != 0)


def test_registry():
    assert {"bce", "bce_ls", "focal", "asl"} <= set(LOSSES)
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        build_loss("nope")
    assert build_loss("BCE-LS").__class__ is LOSSES["bce_ls"]
