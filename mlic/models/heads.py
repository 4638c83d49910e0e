"""Heads: modules mapping feature maps (B, C, h, w) to logits (B, K).

Registered in ``HEADS`` under the names a ModelConfig uses; each is built as
``HEADS[name](in_channels, num_classes, **head_args)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mlic.errors import MlicError
from mlic.registry import HEADS, register_head  # noqa: F401  (HEADS re-exported)


class HeadWeightsError(MlicError):
    """Weights loaded into a head were made for another size (class count, width); the message says what to build."""


def check_head_weights(
    state_dict: dict, prefix: str, head: str, expected: dict[str, tuple[tuple[int, ...], Callable[[tuple], str]]],
) -> None:
    """Before a head loads weights: each listed key present in ``state_dict`` must have the head's shape.

    Args:
        state_dict: what ``load_state_dict`` was given; keys under ``prefix`` belong to the head.
        prefix: the head's prefix in ``state_dict``.
        head: the head's registry name, for the message.
        expected: key (relative to the head) -> (the head's shape, hint: the file's shape -> the head settings
            that would fit it).
    """
    for key, (shape, hint) in expected.items():
        value = state_dict.get(prefix + key)
        if value is not None and tuple(value.shape) != tuple(shape):
            found = tuple(value.shape)
            raise HeadWeightsError(f"{head} head: the weights' {prefix}{key} has shape {found} but this head has "
                                   f"{tuple(shape)}; build the head with {hint(found)} to load them")


@register_head("boostlu")
class BoostLUHead(nn.Module):
    """BoostLU (Kim et al., CVPR 2023): positive class activations boosted by alpha before average pooling.

    CAM A = W·F + b at every location (a 1×1 convolution with the ``fc`` weights), A' = alpha·A where
    A > 0 else A, logits = mean of A' over the h·w locations. As in the official code the boost applies
    in training and at inference; alpha = 1 is the plain GAP -> linear head. Usable with any loss.

    Args:
        in_channels: C of the feature map.
        num_classes: K.
        alpha: boost factor of positive activations (official default 5).

    Parameters ``fc.weight`` (K, C), ``fc.bias`` (K,).
    """

    def __init__(self, in_channels: int, num_classes: int, alpha: float = 5.0) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self.fc = nn.Linear(in_channels, num_classes)

    def class_activation(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> CAM before the boost (B, K, h, w), bias included."""
        if features.ndim != 4:
            raise MlicError(f"boostlu head: needs feature maps (B, C, h, w), got shape {tuple(features.shape)}; "
                             "the boost acts on each location, so pooled features cannot be used")
        return F.conv2d(features, self.fc.weight[:, :, None, None], self.fc.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) feature maps -> (B, K) logits."""
        cam = self.class_activation(features)
        return torch.where(cam > 0, cam * self.alpha, cam).mean(dim=(2, 3))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        check_head_weights(state_dict, prefix, "boostlu", {
            "fc.bias": ((self.fc.out_features,), lambda s: f"num_classes={s[0]}"),
            "fc.weight": ((self.fc.out_features, self.fc.in_features),
                          lambda s: f"num_classes={s[0]} on a backbone with {s[1]} channels"),
        })
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


@register_head("linear")
class LinearHead(nn.Module):
    """Global average pooling followed by one linear layer.

    Args:
        in_channels: C of the feature map.
        num_classes: K.
        dropout: dropout before the linear layer.
    """

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) or pooled (B, C) features -> (B, K) logits."""
        pooled = features.mean(dim=(2, 3)) if features.ndim == 4 else features
        return self.fc(self.dropout(pooled))


def sine_position_encoding(
    height: int, width: int, dim: int, temperature: float = 10000.0, scale: float = 2 * math.pi,
    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """DETR's normalised 2-D sine position encoding, for any grid size.

    Channels ``[0, dim/2)`` encode the row (y), ``[dim/2, dim)`` the column (x); within each half,
    even indices hold sines and odd indices cosines of ``pos / temperature^(2*(i//2)/(dim/2))``,
    with positions 1..n normalised to ``(0, scale]``. Computed in float32 (as the official code
    stores it) and cast to ``dtype``.

    Args:
        height: rows h of the feature map.
        width: columns w of the feature map.
        dim: channels d (even); ``num_pos_feats = d / 2``.

    Returns:
        (h*w, d) tensor, row-major over the grid (index ``i*w + j``).
    """
    if dim % 2:
        raise MlicError(f"position encoding needs an even number of channels, got {dim}")
    npf = dim // 2
    eps = 1e-6
    y = torch.arange(1, height + 1, dtype=torch.float32, device=device)
    x = torch.arange(1, width + 1, dtype=torch.float32, device=device)
    y = y / (y[-1:] + eps) * scale
    x = x / (x[-1:] + eps) * scale
    dim_t = torch.arange(npf, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / npf)

    def encode(coord: torch.Tensor) -> torch.Tensor:  # (n,) -> (n, npf), sin on even, cos on odd
        angles = coord[:, None] / dim_t
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(y)[:, None, :].expand(height, width, npf)
    pos_x = encode(x)[None, :, :].expand(height, width, npf)
    return torch.cat((pos_y, pos_x), dim=-1).reshape(height * width, dim).to(dtype)


class MultiheadAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameters, batch-first, on fused SDPA.

    Parameters: packed ``in_proj_weight`` (3d, d) / ``in_proj_bias`` (3d,) for q, k, v and
    ``out_proj``. When ``query is key`` the q and k projections run as one matmul.

    Args:
        dim: model width d.
        num_heads: number of heads (divides d).
        dropout: dropout on the attention weights (training only).
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise MlicError(f"hidden_dim {dim} is not divisible by nheads {num_heads}")
        self.dim, self.num_heads, self.dropout = dim, num_heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend ``query`` (B, Lq, d) over ``key`` / ``value`` (B, Lk, d).

        Returns:
            output (B, Lq, d) and, when ``need_weights``, the head-averaged weights (B, Lq, Lk).
        """
        d, heads = self.dim, self.num_heads
        w, b = self.in_proj_weight, self.in_proj_bias
        if query is key:
            q, k = F.linear(query, w[: 2 * d], b[: 2 * d]).chunk(2, dim=-1)
        else:
            q = F.linear(query, w[:d], b[:d])
            k = F.linear(key, w[d: 2 * d], b[d: 2 * d])
        v = F.linear(value, w[2 * d:], b[2 * d:])
        batch, lq, lk = q.shape[0], q.shape[1], k.shape[1]
        q = q.view(batch, lq, heads, d // heads).transpose(1, 2)
        k = k.view(batch, lk, heads, d // heads).transpose(1, 2)
        v = v.view(batch, lk, heads, d // heads).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:  # explicit softmax so the weights can be returned; same numbers as SDPA
            attn = torch.softmax((q * (d // heads) ** -0.5) @ k.transpose(-2, -1), dim=-1)
            weights = attn.mean(dim=1)
            out = F.dropout(attn, p, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        out = out.transpose(1, 2).reshape(batch, lq, d)
        return self.out_proj(out), weights


class EncoderLayer(nn.Module):
    """DETR post-norm encoder layer: self-attention (q = k = x + pos, v = x), norm1, FFN, norm2."""

    def __init__(self, dim: int, nheads: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(dim, nheads, dropout)
        self.linear1 = nn.Linear(dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x (B, N, d), pos (N, d) -> (B, N, d)."""
        q = x + pos
        x = self.norm1(x + self.dropout(self.self_attn(q, q, x)[0]))
        return self.norm2(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class DecoderLayer(nn.Module):
    """DETR post-norm decoder layer; the released Query2Label models drop its self-attention (and norm1).

    Order: [self-attention, norm1], cross-attention (q = tgt + query_pos, k = memory + pos,
    v = memory), norm2, FFN, norm3.
    """

    def __init__(self, dim: int, nheads: int, dim_feedforward: int, dropout: float, self_attn: bool) -> None:
        super().__init__()
        if self_attn:
            self.self_attn = MultiheadAttention(dim, nheads, dropout)
            self.norm1 = nn.LayerNorm(dim)
        else:
            self.self_attn = self.norm1 = None
        self.multihead_attn = MultiheadAttention(dim, nheads, dropout)
        self.linear1 = nn.Linear(dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor, query_pos: torch.Tensor,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tgt (B, K, d), memory (B, N, d), pos (N, d), query_pos (K, d) -> (B, K, d) [, weights (B, K, N)]."""
        if self.self_attn is not None:
            q = tgt + query_pos
            tgt = self.norm1(tgt + self.dropout(self.self_attn(q, q, tgt)[0]))
        out, weights = self.multihead_attn(tgt + query_pos, memory + pos, memory, need_weights=need_weights)
        tgt = self.norm2(tgt + self.dropout(out))
        tgt = self.norm3(tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))
        return tgt, weights


class TransformerEncoder(nn.Module):
    """A stack of encoder layers (no final norm, as DETR's post-norm encoder)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, pos)
        return x


class TransformerDecoder(nn.Module):
    """A stack of decoder layers and a final LayerNorm; the target starts at zeros."""

    def __init__(self, layers: list[nn.Module], dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, memory: torch.Tensor, pos: torch.Tensor, query_pos: torch.Tensor, need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """memory (B, N, d) -> (B, K, d) label embeddings [, last layer's cross-attention (B, K, N)]."""
        tgt = memory.new_zeros(memory.shape[0], query_pos.shape[0], memory.shape[2])
        weights = None
        for i, layer in enumerate(self.layers):
            tgt, weights = layer(tgt, memory, pos, query_pos, need_weights and i == len(self.layers) - 1)
        return self.norm(tgt), weights


class GroupWiseLinear(nn.Module):
    """One linear classifier per label: ``logit_k = <W[0, k], h_k> + b[0, k]``.

    Parameters ``W`` (1, K, d) and ``b`` (1, K), as in the official Query2Label code.
    """

    def __init__(self, num_classes: int, dim: int, bias: bool = True) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(dim)
        self.W = nn.Parameter(torch.empty(1, num_classes, dim).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.empty(1, num_classes).uniform_(-bound, bound)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, d) -> (B, K)."""
        out = (self.W * x).sum(-1)
        return out + self.b if self.b is not None else out


@register_head("query2label")
class Query2LabelHead(nn.Module):
    """Query2Label (Liu et al. 2021): label queries cross-attend to the feature map.

    Feature map -> [1×1 input projection] -> + sine position encoding -> transformer encoder ->
    decoder whose K learned queries (``query_embed``) attend to the memory -> GroupWiseLinear.
    Parameter names follow the official code (``encoder``/``decoder`` = its ``transformer.*``).

    Args:
        in_channels: C of the backbone's feature map.
        num_classes: K, one query per label.
        hidden_dim: transformer width d (default: ``in_channels``).
        dim_feedforward: FFN width (default: 4·d).
        enc_layers: encoder layers.
        dec_layers: decoder layers.
        nheads: attention heads.
        dropout: dropout in attention and FFN (training only).
        keep_input_proj: use a 1×1 conv C -> d (default: only when d ≠ C; required then).
        decoder_self_attn: keep self-attention in decoder layers after the first (released models: no).
        first_decoder_self_attn: same for the first decoder layer (default: ``decoder_self_attn``).
    """

    def __init__(
        self, in_channels: int, num_classes: int, hidden_dim: int | None = None, dim_feedforward: int | None = None,
        enc_layers: int = 1, dec_layers: int = 2, nheads: int = 4, dropout: float = 0.1,
        keep_input_proj: bool | None = None, decoder_self_attn: bool = False,
        first_decoder_self_attn: bool | None = None,
    ) -> None:
        super().__init__()
        d = int(hidden_dim or in_channels)
        if keep_input_proj is None:
            keep_input_proj = d != in_channels
        if not keep_input_proj and d != in_channels:
            raise MlicError(f"query2label: hidden_dim {d} differs from the backbone's {in_channels} channels; "
                             "set keep_input_proj: true (or hidden_dim equal to the channels)")
        if dec_layers < 1:
            raise MlicError("query2label: dec_layers must be at least 1")
        ff = int(dim_feedforward or 4 * d)
        first = decoder_self_attn if first_decoder_self_attn is None else first_decoder_self_attn
        self.hidden_dim, self.num_classes = d, num_classes
        self.input_proj = nn.Conv2d(in_channels, d, kernel_size=1) if keep_input_proj else nn.Identity()
        self.encoder = TransformerEncoder([EncoderLayer(d, nheads, ff, dropout) for _ in range(enc_layers)])
        self_attn = [first] + [decoder_self_attn] * (dec_layers - 1)
        self.decoder = TransformerDecoder([DecoderLayer(d, nheads, ff, dropout, sa) for sa in self_attn], d)
        for name, p in self.named_parameters():  # DETR initialises the transformer's matrices with Xavier
            if p.dim() > 1 and name.startswith(("encoder.", "decoder.")):
                nn.init.xavier_uniform_(p)
        self.query_embed = nn.Embedding(num_classes, d)
        self.fc = GroupWiseLinear(num_classes, d)

    def forward(
        self, features: torch.Tensor, return_attention: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, C, h, w) feature maps -> (B, K) logits.

        With ``return_attention``, also the last decoder layer's cross-attention of each label
        query over the grid, averaged over heads: (B, K, h, w), each map summing to 1.
        """
        x = self.input_proj(features)
        batch, d, h, w = x.shape
        pos = sine_position_encoding(h, w, d, device=x.device, dtype=x.dtype)
        memory = self.encoder(x.flatten(2).transpose(1, 2), pos)
        hs, weights = self.decoder(memory, pos, self.query_embed.weight.to(x.dtype), need_weights=return_attention)
        logits = self.fc(hs)
        if return_attention:
            return logits, weights.reshape(batch, -1, h, w)
        return logits
