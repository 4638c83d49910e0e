"""CvT (Wu et al. 2021), the Convolutional vision Transformer, as a feature-map backbone.

timm has no CvT, so it is written here with the parameter layout of microsoft/CvT
(``stage{i}.patch_embed``, ``stage{i}.blocks.{j}.attn.conv_proj_{q,k,v}.{conv,bn}``,
``proj_{q,k,v}``, ``proj``, ``mlp.fc1/fc2``, ``stage2.cls_token``, ``norm``): official weights
(ImageNet ones, or the backbone of a Query2Label release) load by name, without renaming.

As Query2Label uses it, the output is the last stage's token grid after the final LayerNorm,
(B, 1024, H/16, W/16) for CvT-w24; the last stage's class token takes part in attention and is
then dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

from mlic.models.backbones import read_state_dict, register_backbone, strip_prefixes
from mlic.models.weights import check_state_dict


@dataclass(frozen=True)
class CvTSpec:
    """Architecture of a CvT; per-stage tuples have one entry per stage."""

    dims: tuple[int, ...] = (192, 768, 1024)
    """Embedding width of each stage."""
    depths: tuple[int, ...] = (2, 2, 20)
    """Transformer blocks of each stage."""
    heads: tuple[int, ...] = (3, 12, 16)
    """Attention heads of each stage."""
    patch_sizes: tuple[int, ...] = (7, 3, 3)
    """Kernel of each stage's convolutional token embedding."""
    patch_strides: tuple[int, ...] = (4, 2, 2)
    """Stride of each stage's token embedding (the product is the output stride)."""
    patch_paddings: tuple[int, ...] = (2, 1, 1)
    """Padding of each stage's token embedding."""
    mlp_ratio: float = 4.0
    """MLP hidden width over the embedding width."""
    cls_token: tuple[bool, ...] = (False, False, True)
    """Whether a stage carries a class token through its blocks."""
    qkv_bias: bool = True
    """Bias on the q/k/v linear projections."""
    kernel_qkv: int = 3
    """Kernel of the depth-wise convolutional q/k/v projections."""
    stride_q: int = 1
    """Stride of the query projection."""
    stride_kv: int = 2
    """Stride of the key/value projections (squeezed attention)."""


CVT_W24 = CvTSpec()
"""CvT-w24 (microsoft/CvT ``cvt-w24-384x384.yaml``): 192/768/1024 wide, depths 2/2/20, heads 3/12/16."""


class QuickGELU(nn.Module):
    """x·σ(1.702x), the activation CvT was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ConvEmbed(nn.Module):
    """Strided convolution then LayerNorm over channels: (B, C_in, H, W) -> (B, C, H/s, W/s)."""

    def __init__(self, in_chans: int, dim: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel, stride, padding)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvProjection(nn.Sequential):
    """Depth-wise convolution + BatchNorm (CvT's ``dw_bn``): (B, C, H, W) -> (B, C, H/s, W/s)."""

    def __init__(self, dim: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel, stride, kernel // 2, groups=dim, bias=False)
        self.bn = nn.BatchNorm2d(dim)


class ConvAttention(nn.Module):
    """Attention over convolutionally projected tokens.

    Note CvT scales scores by ``dim ** -0.5`` (the full width, not the head width), as trained.
    """

    def __init__(self, dim: int, num_heads: int, spec: CvTSpec, with_cls_token: bool) -> None:
        super().__init__()
        self.num_heads, self.with_cls_token, self.scale = num_heads, with_cls_token, dim ** -0.5
        self.conv_proj_q = ConvProjection(dim, spec.kernel_qkv, spec.stride_q)
        self.conv_proj_k = ConvProjection(dim, spec.kernel_qkv, spec.stride_kv)
        self.conv_proj_v = ConvProjection(dim, spec.kernel_qkv, spec.stride_kv)
        self.proj_q = nn.Linear(dim, dim, bias=spec.qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=spec.qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=spec.qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """x (B, [1 +] h*w, C) -> (B, [1 +] h*w, C)."""
        batch, _, dim = x.shape
        cls = None
        if self.with_cls_token:
            cls, x = x[:, :1], x[:, 1:]
        grid = x.transpose(1, 2).reshape(batch, dim, h, w)
        q, k, v = (proj(grid).flatten(2).transpose(1, 2) for proj in (self.conv_proj_q, self.conv_proj_k,
                                                                       self.conv_proj_v))
        if cls is not None:
            q, k, v = (torch.cat((cls, t), dim=1) for t in (q, k, v))
        heads = self.num_heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, t.shape[1], heads, dim // heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.proj_q(q)), split(self.proj_k(k)), split(self.proj_v(v)),
                                             scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(batch, -1, dim))


class Mlp(nn.Module):
    """fc1 -> QuickGELU -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = QuickGELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with convolutional attention."""

    def __init__(self, dim: int, num_heads: int, spec: CvTSpec, with_cls_token: bool, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ConvAttention(dim, num_heads, spec, with_cls_token)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * spec.mlp_ratio))

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Stage(nn.Module):
    """Token embedding, optional class token, blocks: (B, C_in, H, W) -> (B, C, H/s, W/s)."""

    def __init__(self, index: int, in_chans: int, spec: CvTSpec, drop_path: list[float]) -> None:
        super().__init__()
        i, dim = index, spec.dims[index]
        self.patch_embed = ConvEmbed(in_chans, dim, spec.patch_sizes[i], spec.patch_strides[i], spec.patch_paddings[i])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if spec.cls_token[i] else None
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, spec.heads[i], spec, spec.cls_token[i], dp) for dp in drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        batch, dim, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(batch, -1, -1).to(x.dtype), x), dim=1)
        for block in self.blocks:
            x = block(x, h, w)
        if self.cls_token is not None:
            x = x[:, 1:]
        return x.transpose(1, 2).reshape(batch, dim, h, w)


class CvT(nn.Module):
    """CvT feature extractor: (B, 3, H, W) -> (B, dims[-1], H/16, W/16), final LayerNorm applied.

    Args:
        spec: architecture (default CvT-w24).
        drop_path_rate: stochastic depth of the last stage, rising linearly over its blocks.
        pretrained: local weight file with microsoft/CvT key names (its ``head.*`` is ignored).
    """

    def __init__(self, spec: CvTSpec = CVT_W24, drop_path_rate: float = 0.0,
                 pretrained: str | Path | None = None) -> None:
        super().__init__()
        self.spec = spec
        in_chans = 3
        for i in range(len(spec.dims)):
            rate = drop_path_rate if i == len(spec.dims) - 1 else 0.0
            n = spec.depths[i]
            dp = [rate * j / (n - 1) if n > 1 else 0.0 for j in range(n)]
            setattr(self, f"stage{i}", Stage(i, in_chans, spec, dp))
            in_chans = spec.dims[i]
        self.norm = nn.LayerNorm(spec.dims[-1])
        self.num_channels = spec.dims[-1]
        self.apply(self._init_weights)
        if pretrained:
            self.load_pretrained(pretrained)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def load_pretrained(self, path: str | Path) -> None:
        """Load microsoft/CvT weights strictly, except the classifier ``head``."""
        state = {k: v for k, v in strip_prefixes(read_state_dict(path)).items() if not k.startswith("head.")}
        self.load_state_dict(check_state_dict(state, self, path, "this CvT"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(len(self.spec.dims)):
            x = getattr(self, f"stage{i}")(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


@register_backbone("cvt_w24")
def cvt_w24(pretrained: str | Path | None = None, drop_path_rate: float = 0.0) -> CvT:
    """CvT-w24 (as in Q2L-CvT_w24-384): 1024 channels at stride 16."""
    return CvT(CVT_W24, drop_path_rate=drop_path_rate, pretrained=pretrained)
