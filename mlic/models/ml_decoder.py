"""ML-Decoder (Ridnik et al. 2021): a classification head whose G group queries cross-attend to the feature map.

Feature map (B, C, h, w) -> tokens (B, h·w, C) -> memory ReLU(W_e·x + b_e) (B, N, D) -> one post-norm
decoder layer without self-attention, over G fixed (not learned) random queries -> (B, G, D) -> group
FC: each query yields ``dup = ceil(K / G)`` logits, the first K are kept. With G capped at 100 queries
(``num_of_groups=-1``) the attention cost no longer grows with K; only the group FC does, linearly.

The parameter names are the official ``MLDecoder``'s (Alibaba-MIIL/ML_Decoder): ``decoder.duplicate_pooling``
(G, D, dup), ``decoder.duplicate_pooling_bias`` (K), ``decoder.layers.0.*``, ``decoder.embed_standart.*``
(D, C), ``decoder.query_embed.weight`` (G, D), so the authors' weights load strictly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mlic.errors import MlicError
from mlic.models.heads import MultiheadAttention, check_head_weights
from mlic.registry import register_head


def ml_decoder_sizes(num_classes: int, num_of_groups: int = -1, decoder_embedding: int = 768) -> tuple[int, int, int]:
    """(G queries, D width, dup logits per query) of an ML-Decoder head, as the official constructor derives them.

    G is 100 for ``num_of_groups < 0``, else ``num_of_groups``, capped at K; a negative
    ``decoder_embedding`` means 768. ``dup`` is ceil(K / G). The official ``int(K / G + 0.999)`` is one short
    when K / G exceeds an integer by less than 0.001, and its forward then fails; such a model never ran,
    so no released weights have that shape, and the exact ceiling is used.
    """
    if num_classes < 1:
        raise MlicError(f"ml_decoder: num_classes must be at least 1, got {num_classes}")
    if num_of_groups == 0:
        raise MlicError("ml_decoder: num_of_groups must be positive, or -1 for min(100, num_classes) queries")
    groups = min(100 if num_of_groups < 0 else int(num_of_groups), num_classes)
    dim = 768 if decoder_embedding < 0 else int(decoder_embedding)
    return groups, dim, math.ceil(num_classes / groups)


class MLDecoderLayer(nn.Module):
    """The official ``TransformerDecoderLayerOptimal``: post-norm, no self-attention.

    t = LN1(Q + dropout1(Q)); t = LN2(t + dropout2(MHA(t, e, e))); t = LN3(t + dropout3(FFN(t))).

    Args:
        dim: width D.
        nheads: attention heads.
        dim_feedforward: FFN width.
        dropout: every dropout's p (training only).
        double_query: official behaviour (default): the queries enter as ``Q + dropout1(Q)``, which in
            eval is 2·Q; through LayerNorm's eps that is not LN1(Q). False: ``LN1(Q)``, no query dropout.
    """

    def __init__(self, dim: int, nheads: int = 8, dim_feedforward: int = 2048, dropout: float = 0.1,
                 double_query: bool = True) -> None:
        super().__init__()
        self.double_query = double_query
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.multihead_attn = MultiheadAttention(dim, nheads, dropout)
        self.linear1 = nn.Linear(dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """queries (B, G, D), memory (B, N, D) -> (B, G, D)."""
        t = queries + self.dropout1(queries) if self.double_query else queries
        t = self.norm1(t)
        t = self.norm2(t + self.dropout2(self.multihead_attn(t, memory, memory)[0]))
        return self.norm3(t + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(t))))))


class MLDecoderBody(nn.Module):
    """Holds the official ``decoder.*`` tensors, in the official state-dict order."""

    def __init__(self, in_channels: int, num_classes: int, groups: int, dim: int, dup: int, nheads: int,
                 dim_feedforward: int, dropout: float, double_query: bool) -> None:
        super().__init__()
        self.duplicate_pooling = nn.Parameter(torch.empty(groups, dim, dup))
        self.duplicate_pooling_bias = nn.Parameter(torch.zeros(num_classes))
        self.layers = nn.ModuleList([MLDecoderLayer(dim, nheads, dim_feedforward, dropout, double_query)])
        self.embed_standart = nn.Linear(in_channels, dim)
        self.query_embed = nn.Embedding(groups, dim)  # N(0, 1), never trained: the official code freezes it
        self.query_embed.requires_grad_(False)
        nn.init.xavier_normal_(self.duplicate_pooling)


@register_head("ml_decoder")
class MLDecoderHead(nn.Module):
    """ML-Decoder head on any backbone's feature map.

    Args:
        in_channels: C of the feature map.
        num_classes: K.
        num_of_groups: queries G; -1 (official default) means min(100, K); always capped at K.
        decoder_embedding: width D (-1 means 768).
        nheads: attention heads (official: 8).
        dim_feedforward: FFN width (official: 2048).
        dropout: dropout p in attention, FFN and residuals (official: 0.1; training only).
        double_query: the official query doubling (see :class:`MLDecoderLayer`); False feeds LN1(Q).
    """

    def __init__(self, in_channels: int, num_classes: int, num_of_groups: int = -1, decoder_embedding: int = 768,
                 nheads: int = 8, dim_feedforward: int = 2048, dropout: float = 0.1, double_query: bool = True) -> None:
        super().__init__()
        groups, dim, dup = ml_decoder_sizes(num_classes, num_of_groups, decoder_embedding)
        if dim % nheads:
            raise MlicError(f"ml_decoder: decoder_embedding {dim} is not divisible by nheads {nheads}")
        self.num_classes, self.num_groups, self.dim, self.duplicate_factor = num_classes, groups, dim, dup
        self.decoder = MLDecoderBody(in_channels, num_classes, groups, dim, dup, nheads, dim_feedforward, dropout,
                                     double_query)

    def forward_decoder(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features -> (memory (B, N, D), decoder output (B, G, D)).

        ``features``: (B, C, h, w) maps (tokens in row-major order), (B, N, C) tokens, or (B, C)
        pooled features (one token).
        """
        if features.ndim == 4:
            tokens = features.flatten(2).transpose(1, 2)
        elif features.ndim == 3:
            tokens = features
        else:
            tokens = features[:, None, :]
        dec = self.decoder
        memory = F.relu(dec.embed_standart(tokens))
        queries = dec.query_embed.weight.to(memory.dtype).expand(memory.shape[0], -1, -1)
        return memory, dec.layers[0](queries, memory)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) feature maps (or (B, N, C) tokens) -> (B, K) logits; class k is query k // dup."""
        _, hidden = self.forward_decoder(features)
        pooling = self.decoder.duplicate_pooling.to(hidden.dtype)
        out = torch.einsum("bgd,gdj->bgj", hidden, pooling).flatten(1)[:, : self.num_classes]
        return out + self.decoder.duplicate_pooling_bias.to(out.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        check_head_weights(state_dict, prefix, "ml_decoder", {
            "decoder.duplicate_pooling_bias": ((self.num_classes,), lambda s: f"num_classes={s[0]}"),
            "decoder.query_embed.weight": ((self.num_groups, self.dim),
                                           lambda s: f"num_of_groups={s[0]}, decoder_embedding={s[1]}"),
        })
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"classes={self.num_classes}, queries={self.num_groups}, dim={self.dim}, dup={self.duplicate_factor}"
