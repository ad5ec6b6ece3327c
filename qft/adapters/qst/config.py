"""QstConfig: the peft config of Quantized Side Tuning (Zhang et al., 2024, arXiv:2401.07159)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig

from qft.errors import QftError

DOWNSAMPLE_KINDS = ("lora", "pool", "maxpool", "linear")
READOUTS = ("token", "mean", "token+mean")


@dataclass
class QstConfig(PeftConfig):
    """A side network beside a frozen (usually 4-bit) causal LM; see ``qft.adapters.qst``."""

    r: int = field(default=16, metadata={
        "help": "Side reduction factor: the side network is hidden_size / r wide (the paper's r, 16 by default)."})
    downsample: str = field(default="lora", metadata={
        "help": "How each layer's hidden state is shrunk to the side width: 'lora' (low-rank adapter A->act->B "
                "+ LayerNorm, as in the reference code), 'pool' / 'maxpool' (gradient-free average / max pooling "
                "along the hidden dimension), or 'linear' (one dense projection)."})
    lora_rank: int = field(default=16, metadata={"help": "Inner rank of the 'lora' downsample modules."})
    activation: str = field(default="silu", metadata={
        "help": "Activation between the 'lora' downsample's A and B (a transformers ACT2FN name)."})
    num_heads: int = field(default=0, metadata={
        "help": "Attention heads of each side block; 0 picks the most heads (<= 8) with head size >= 16."})
    mlp_ratio: int = field(default=4, metadata={"help": "Side block MLP width = side width x this."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the downsampled states and side blocks."})
    output_gate_scale: float = field(default=10.0, metadata={
        "help": "The output gate beta (1 - the paper's alpha) is stored as beta / this: under Adam it then moves "
                "this many times faster than the side network's weights. At 1, beta crept to about 0.1 in 300 "
                "steps and the side network's output barely reached the head (SmolLM2, SST-2)."})
    input_norm: bool = field(default=False, metadata={
        "help": "RMS-normalise each hidden state (per token, no weights) before its downsample, as each LLM layer "
                "normalises its own input. LLM hidden states carry 'massive activations' (SmolLM2-135M: the first "
                "token's state has RMS ~930 and entries of 22,000 from layer 12 on, other tokens RMS 3 to 30), "
                "which otherwise dominate the downsample's inputs and gradients."})
    standardize: bool = field(default=False, metadata={
        "help": "Standardise each hidden dimension of each layer's states before its downsample, (h - mean) / std "
                "clamped to +-8, with running statistics over the real tokens but each sequence's first (kept as "
                "buffers and saved with the adapter; a training batch uses its own, as batch norm does). Linear probes "
                "standardise their features the same way; a few dimensions of an LLM's states otherwise dominate "
                "what the downsample sees."})
    uniform_attention: bool = field(default=False, metadata={
        "help": "Start each side block's query and key projections at zero, so its attention starts as a causal "
                "mean over the positions so far. Linear probes on SmolLM2-135M's frozen states score 85.4 on SST-2 "
                "when mean-pooled over the tokens, against 82.6 at the last token alone."})
    gate_init: float = field(default=0.0, metadata={
        "help": "Initial logit of each layer's gate; the side state is (1-sigmoid(g)) * downsampled + "
                "sigmoid(g) * previous side state (0 gives 0.5, as in the paper)."})
    readout: str = field(default="token", metadata={
        "help": "What the side network hands to the upsample at each position t: 'token' (its state at t, as in "
                "the paper), 'mean' (the mean of its states at positions <= t, padding left out) or 'token+mean' "
                "(both, concatenated). Causal either way, so generation works. Linear probes on SmolLM2-135M's "
                "frozen states score 85.4 on SST-2 mean-pooled over the tokens, 82.6 at the last token alone."})
    gate_scale: float = field(default=1.0, metadata={
        "help": "Each layer's gate logit is stored divided by this, so that Adam moves it this many times faster "
                "(as output_gate_scale does for the output gate; Ladder Side-Tuning divides its gates by a "
                "temperature of 0.1). At 1 a gate moves about lr x steps, 0.3 in 300 steps at lr 1e-3, so the "
                "initial mix of layers stays."})

    def __post_init__(self):
        super().__post_init__()
        from qft.registry import add_peft_type

        self.peft_type = add_peft_type("qst")
        if self.task_type is None:
            self.task_type = "CAUSAL_LM"
        if self.task_type != "CAUSAL_LM":
            raise QftError(f"QST supports task_type CAUSAL_LM only, got {self.task_type!r}",
                           "leave task_type unset or pass 'CAUSAL_LM'")
        if self.r < 1:
            raise QftError(f"QST side reduction r must be at least 1, got {self.r}", "pass e.g. r=16")
        if self.downsample not in DOWNSAMPLE_KINDS:
            raise QftError(f"unknown QST downsample {self.downsample!r}",
                           f"choose one of {', '.join(DOWNSAMPLE_KINDS)}")
        for name in ("lora_rank", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise QftError(f"QST {name} must be at least 1, got {getattr(self, name)}", f"pass a positive {name}")
        if self.readout not in READOUTS:
            raise QftError(f"unknown QST readout {self.readout!r}", f"choose one of {', '.join(READOUTS)}")
        if not self.gate_scale > 0:
            raise QftError(f"QST gate_scale must be positive, got {self.gate_scale}", "pass e.g. 1 or 10")
        if not self.output_gate_scale > 0:
            raise QftError(f"QST output_gate_scale must be positive, got {self.output_gate_scale}", "pass e.g. 10")
        if self.num_heads < 0:
            raise QftError(f"QST num_heads must be 0 (auto) or positive, got {self.num_heads}", "pass 0 or e.g. 4")
        if not 0 <= self.dropout < 1:
            raise QftError(f"QST dropout must be in [0, 1), got {self.dropout}", "pass e.g. 0.1")
        from transformers.activations import ACT2FN

        if self.activation not in ACT2FN:
            raise QftError(f"unknown activation {self.activation!r}", "pass e.g. 'silu', 'gelu' or 'relu'")
