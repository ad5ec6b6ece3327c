"""QST's pure tensor math, each fast path beside a slow, obviously-right reference (tested against each other).

- pooling along the hidden dimension, the paper's gradient-free downsample (``pool_hidden``);
- the side blocks' attention mask (causal + padding) and attention (``side_attention``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def pool_hidden(x: torch.Tensor, width: int, mode: str = "avg") -> torch.Tensor:
    """Average or max pool the last dimension of ``x`` down to ``width`` (torch's adaptive-pooling bins).

    (..., hidden) -> (..., width). Bin i covers [floor(i*hidden/width), ceil((i+1)*hidden/width)), so a
    hidden size that ``width`` does not divide still works.
    """
    lead, hidden = x.shape[:-1], x.shape[-1]
    flat = x.reshape(-1, 1, hidden)
    pooled = F.adaptive_avg_pool1d(flat, width) if mode == "avg" else F.adaptive_max_pool1d(flat, width)
    return pooled.reshape(*lead, width)


def pool_hidden_reference(x: torch.Tensor, width: int, mode: str = "avg") -> torch.Tensor:
    """Slow reference of ``pool_hidden``: one bin at a time."""
    hidden = x.shape[-1]
    outs = []
    for i in range(width):
        start, end = (i * hidden) // width, math.ceil((i + 1) * hidden / width)
        chunk = x[..., start:end]
        outs.append(chunk.mean(-1) if mode == "avg" else chunk.amax(-1))
    return torch.stack(outs, dim=-1)


def side_attention_mask(attention_mask: torch.Tensor | None, batch: int, seq: int, device) -> torch.Tensor:
    """Boolean mask (batch, 1, seq, seq), True where query t may attend key s: s <= t and s is not padding.

    Each position may always attend to itself, so a padded query (left padding in generation) never has an
    empty row (which would give NaN); its output is ignored by the loss anyway.
    """
    causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    if attention_mask is None:
        return causal.expand(batch, 1, seq, seq)
    keys = attention_mask[:, None, None, :].to(torch.bool)  # (batch, 1, 1, seq)
    diag = torch.eye(seq, dtype=torch.bool, device=device)
    return (causal & keys) | diag


def side_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                   dropout_p: float = 0.0) -> torch.Tensor:
    """Masked softmax attention, (batch, heads, seq, head_dim) -> same, through torch's fused kernel."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def side_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Slow reference of ``side_attention`` (no dropout): softmax(q k^T / sqrt(d) masked) v."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v
