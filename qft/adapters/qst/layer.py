"""QST's side network and the peft tuner layer that holds it.

Per backbone layer i (hidden states h_0 = embeddings, h_1 .. h_L = layer outputs, from the frozen LLM):

    s_0 = down_0(n(h_0))
    s_i = block_i((1 - sigmoid(g_i)) * down_i(n(h_i)) + sigmoid(g_i) * s_{i-1})        i = 1..L
    (g_i is stored divided by ``gate_scale``)
    out = (1 - beta) * h_L + beta * up(read(norm(s_L)))                              beta starts at 0

read is the identity, or with ``readout`` the causal mean over positions (or both); n is the identity, an RMS
norm per token (``input_norm``: the LLM's hidden states carry massive activations) and/or, with ``standardize``,
a per-dimension standardisation by running statistics, as batch norm does. h_L is the decoder's
``last_hidden_state`` (after its final norm, as transformers 5 reports it); ``out`` replaces it, so it goes into
the LLM's frozen LM head. The side width is hidden / r. The paper's output gate
alpha = 1 - beta starts at 1, so at initialisation the model's output is exactly the LLM's (the reference
code instead starts a per-dimension sigmoid gate at sigmoid(1) = 0.73, which does not reproduce the LLM at
step 0). It is stored as beta, starting at 0, because TRL casts a quantized model's trainable parameters to
bf16, whose spacing near 1 (2^-8) would swallow updates to alpha smaller than about 2e-3; and it is stored
divided by ``output_gate_scale`` (10), so that Adam, whose steps are about the learning rate whatever the
gradient's size, moves this one scalar faster than the side network's weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.activations import ACT2FN

from qft.adapters.qst.functional import pool_hidden, side_attention, side_attention_mask
from qft.errors import QftError


class LoraDownsample(nn.Module):
    """hidden -> rank -> act -> width, then LayerNorm (the reference code's AdapterLinear)."""

    def __init__(self, hidden: int, width: int, rank: int, activation: str):
        super().__init__()
        self.A = nn.Linear(hidden, rank, bias=False)
        self.act = ACT2FN[activation]
        self.B = nn.Linear(rank, width, bias=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(self.B(self.act(self.A(h))))


class PoolDownsample(nn.Module):
    """Gradient-free: average or max pooling along the hidden dimension (no parameters)."""

    def __init__(self, width: int, mode: str):
        super().__init__()
        self.width, self.mode = width, mode

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return pool_hidden(h, self.width, self.mode)


def make_downsample(kind: str, hidden: int, width: int, cfg) -> nn.Module:
    if kind == "lora":
        return LoraDownsample(hidden, width, cfg.lora_rank, cfg.activation)
    if kind in ("pool", "maxpool"):
        return PoolDownsample(width, "avg" if kind == "pool" else "max")
    return nn.Linear(hidden, width)


def auto_heads(width: int) -> int:
    """The most heads (8, 4, 2 or 1) that divide ``width`` with a head size of at least 16."""
    return next((h for h in (8, 4, 2) if width % h == 0 and width // h >= 16), 1)


class SideBlock(nn.Module):
    """A small pre-norm transformer block (causal self-attention + MLP) at the side width.

    No positional encoding: its inputs are the LLM's hidden states, which already carry position.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: int, dropout: float, uniform_attention: bool = False):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        if uniform_attention:  # q = k = 0: every score is 0, so the attention is a causal mean of the values
            with torch.no_grad():
                self.qkv.weight[: 2 * width].zero_()
                self.qkv.bias[: 2 * width].zero_()
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, w = s.shape
        q, k, v = self.qkv(self.norm1(s)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        att = side_attention(q, k, v, mask, self.dropout if self.training else 0.0)  # (b, heads, t, head_dim)
        s = s + self.drop(self.proj(att.transpose(1, 2).reshape(b, t, w)))
        return s + self.drop(self.mlp(self.norm2(s)))


STANDARD_MOMENTUM = 0.05  # how far each training batch moves the running statistics (the first sets them)
STANDARD_CLIP = 8.0  # standardised states are clamped: a massive activation would otherwise reach the side network


def real_tokens(attention_mask: torch.Tensor | None, batch: int, seq: int, device) -> torch.Tensor:
    """(batch, seq) bool: the positions that are not padding (all of them without a mask)."""
    if attention_mask is None:
        return torch.ones(batch, seq, dtype=torch.bool, device=device)
    return attention_mask.to(device).bool()


def statistics_rows(attention_mask: torch.Tensor | None, batch: int, seq: int, device) -> torch.Tensor:
    """(batch, seq) bool: the positions whose states count in ``standardize``'s statistics, every real token but
    each sequence's first (whose massive activations would swamp them)."""
    real = real_tokens(attention_mask, batch, seq, device)
    return real & (real.long().cumsum(1) > 1)


def read_out(side: torch.Tensor, attention_mask: torch.Tensor | None, readout: str) -> torch.Tensor:
    """The side states (batch, seq, width) as the upsample reads them: each position's own ('token'), the mean over
    the positions so far with padding left out ('mean'), or both concatenated ('token+mean')."""
    if readout == "token":
        return side
    keep = real_tokens(attention_mask, *side.shape[:2], side.device).to(side.dtype)[..., None]
    mean = (side * keep).cumsum(1) / keep.cumsum(1).clamp_min(1)  # 0 at left padding before the first token
    return mean if readout == "mean" else torch.cat([side, mean], -1)


class SideNetwork(nn.Module):
    """Everything QST trains: downsample modules, per-layer gates, side blocks, upsample and output gate."""

    def __init__(self, hidden: int, out_dim: int, num_layers: int, cfg):
        super().__init__()
        width = hidden // cfg.r
        if width < 1:
            raise QftError(f"QST side width hidden_size // r = {hidden} // {cfg.r} is 0", f"pass r <= {hidden}")
        heads = cfg.num_heads or auto_heads(width)
        if width % heads:
            raise QftError(f"QST side width {width} is not divisible by num_heads={heads}",
                           "pass num_heads=0 (auto) or a divisor of hidden_size // r")
        self.width = width
        self.down = nn.ModuleList(make_downsample(cfg.downsample, hidden, width, cfg) for _ in range(num_layers + 1))
        self.gate_scale = float(cfg.gate_scale)  # stored / gate_scale: Adam moves the gates that much faster
        self.gates = nn.Parameter(torch.full((num_layers,), float(cfg.gate_init) / self.gate_scale))  # one per layer
        self.blocks = nn.ModuleList(SideBlock(width, heads, cfg.mlp_ratio, cfg.dropout, cfg.uniform_attention)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(width)
        self.readout = cfg.readout
        self.up = nn.Linear(width * (2 if cfg.readout == "token+mean" else 1), out_dim)
        self.beta = nn.Parameter(torch.zeros(()))  # output mix / output_gate_scale; 0 = the LLM alone
        self.output_gate_scale = float(cfg.output_gate_scale)
        self.drop = nn.Dropout(cfg.dropout)
        self.input_norm = bool(cfg.input_norm)
        self.standardize = bool(cfg.standardize)
        if self.standardize:  # running per-dimension statistics of each layer's states (saved with the adapter)
            self.register_buffer("state_mean", torch.zeros(num_layers + 1, hidden))
            self.register_buffer("state_var", torch.ones(num_layers + 1, hidden))
            self.register_buffer("state_batches", torch.zeros(()))

    def _input(self, h: torch.Tensor, i: int, device, dtype, stats: tuple | None) -> torch.Tensor:
        h = h.to(device, dtype)
        if self.input_norm:
            h = F.rms_norm(h, (h.shape[-1],), eps=1e-6)
        if self.standardize:
            h = self._standardize(h, i, stats)
        return h

    def _standardize(self, h: torch.Tensor, i: int, stats: tuple | None) -> torch.Tensor:
        """(h - mean) / std per hidden dimension, clamped to +-STANDARD_CLIP: with ``stats`` = (positions, momentum),
        in training, the statistics of those positions, which also move the running ones; else the running ones."""
        if stats is not None:
            rows, m = stats
            x = h[rows].float()
            mean, var = x.mean(0), x.var(0)
            with torch.no_grad():
                self.state_mean[i].lerp_(mean.to(self.state_mean.dtype), m)
                self.state_var[i].lerp_(var.to(self.state_var.dtype), m)
        else:
            mean, var = self.state_mean[i], self.state_var[i]
        z = (h - mean.to(h.dtype)) * torch.rsqrt(var.to(h.dtype) + 1e-5)
        return z.clamp(-STANDARD_CLIP, STANDARD_CLIP)

    def forward(self, hidden_states, final: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """hidden_states: L+1 tensors (batch, seq, hidden); final: (batch, seq, out_dim) that feeds the LM head."""
        device, dtype = self.up.weight.device, self.up.weight.dtype  # the LLM may be bf16 and spread over GPUs
        b, t = final.shape[:2]
        mask = side_attention_mask(attention_mask, b, t, device)
        stats = None  # (positions, momentum) whose statistics standardise this batch: training only
        if self.standardize and self.training:
            rows = statistics_rows(attention_mask, b, t, device)
            if int(rows.sum()) > 1:  # the first training batch sets the running statistics
                stats = (rows, 1.0 if int(self.state_batches) == 0 else STANDARD_MOMENTUM)
        side = self.drop(self.down[0](self._input(hidden_states[0], 0, device, dtype, stats)))
        gates = torch.sigmoid(self.gates * self.gate_scale)
        for i, block in enumerate(self.blocks):
            down = self.drop(self.down[i + 1](self._input(hidden_states[i + 1], i + 1, device, dtype, stats)))
            side = block((1 - gates[i]) * down + gates[i] * side, mask)
        if stats is not None:
            self.state_batches += 1
        up = self.up(read_out(self.norm(side), attention_mask, self.readout))
        # (1 - beta) * h_L + beta * up, in the side network's precision, then h_L's: exactly h_L while beta is 0
        h = final.to(device, dtype)
        mixed = h + (self.beta * self.output_gate_scale) * (up - h)
        return mixed.to(final.device, final.dtype)


class QstLayer(nn.Module, BaseTunerLayer):
    """peft's handle on the side networks (one per adapter name), attached to the LLM as ``qst_side``.

    It wraps no base layer: QST changes no LLM module. Being a ``BaseTunerLayer`` is what lets peft find the
    side network's parameters (trainability, state dict filtering), switch adapters and disable them.
    """

    adapter_layer_names = ("qst_net",)

    def __init__(self):
        super().__init__()
        self.qst_net = nn.ModuleDict()
        self.merged_adapters = []
        self._active_adapter = "default"

    def update_layer(self, adapter_name: str, net: SideNetwork) -> None:
        self.qst_net[adapter_name] = net
        self.set_adapter(self.active_adapters)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise QftError("a QST side network cannot be merged into the LLM's weights",
                       "keep the model wrapped (PeftModel) for inference, or use unload() to drop the side network")

    def unmerge(self) -> None:
        pass
