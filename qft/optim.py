"""Memory-efficient optimizers for ``qft finetune --optim NAME``: existing implementations, never hand-written.

Every name maps to an optimizer that transformers' Trainer already builds (``TrainingArguments.optim``) or,
where transformers has no name for it, to a maintained PyPI implementation handed to the Trainer through
``optimizer_cls_and_kwargs``:

- bitsandbytes 8-bit AdamW and paged AdamW (Dettmers et al., 2022, arXiv:2110.02861), Lion 8/32-bit
  (Chen et al., 2023, arXiv:2302.06675), through transformers' names;
- GaLore (Zhao et al., 2024, arXiv:2403.03507) through transformers + ``galore-torch``;
- APOLLO and APOLLO-Mini (Zhu et al., 2024, arXiv:2412.05270) through transformers + ``apollo-torch``;
  APOLLO-Mini is APOLLO with rank 1, tensor-wise scaling and scale 128 (the paper's setting);
- SPAM (Huang et al., 2025, arXiv:2501.06842) and Stable-SPAM (arXiv:2502.17055) from ``pytorch-optimizer``;
- Q-GaLore (Zhang et al., 2024, arXiv:2407.08296) from ``q-galore-torch``: GaLore with INT4 projection matrices,
  layer-adaptive lazy subspace updates and 8-bit Adam states. q-galore-torch 1.0 was written against
  bitsandbytes 0.43 and calls its optimizer base class with since-changed arguments; ``QGaLoreFactory`` builds
  its optimizer with the arguments bitsandbytes 0.50 takes and runs bitsandbytes' own 8-bit Adam update,
  keeping q-galore-torch's step, projector and INT4 quantization. Q-GaLore's INT8 *weights* (a model-side
  change of every linear layer in the paper's code) are not part of it.

    choice = resolve_optimizer("apollo_mini", learning_rate=1e-3)
    SFTConfig(..., **choice.training_args); SFTTrainer(..., optimizer_cls_and_kwargs=choice.optimizer_cls_and_kwargs)
    optimizer_state_bytes(model, "adamw_8bit", batch)   # bytes of optimizer state after one step
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
from dataclasses import dataclass, field

import torch

from qft.errors import QftError

# Linear layers whose weights low-rank optimizers (GaLore, APOLLO) project; transformers matches "all-linear"
# against every nn.Linear, and frozen weights get no gradient, hence no state.
LOW_RANK_TARGETS = "all-linear"


@dataclass(frozen=True)
class OptimizerInfo:
    name: str  # what --optim takes
    summary: str
    trainer_optim: str | None = None  # transformers' OptimizerNames value; None: ``external`` builds it
    package: str | None = None  # import name the optimizer needs
    pip: str | None = None  # its PyPI name (qft's optional extra installs it)
    optim_args: str | None = None  # transformers' --optim_args string
    external: str | None = None  # "module:Class" of a PyPI optimizer transformers has no name for
    low_rank: bool = False  # needs optim_target_modules
    needs_cuda: bool = False


OPTIMIZERS = {o.name: o for o in (
    OptimizerInfo("adamw_torch", "PyTorch AdamW, 32-bit states (8 bytes per trainable parameter)", "adamw_torch"),
    OptimizerInfo("adamw_8bit", "bitsandbytes 8-bit AdamW (block-wise quantized states, ~2 bytes per parameter)",
                  "adamw_8bit", "bitsandbytes", "bitsandbytes"),
    OptimizerInfo("paged_adamw_8bit", "bitsandbytes 8-bit AdamW in paged (unified) memory; QLoRA's optimizer",
                  "paged_adamw_8bit", "bitsandbytes", "bitsandbytes", needs_cuda=True),
    OptimizerInfo("paged_adamw_32bit", "bitsandbytes 32-bit AdamW in paged memory", "paged_adamw_32bit",
                  "bitsandbytes", "bitsandbytes", needs_cuda=True),
    OptimizerInfo("lion_8bit", "bitsandbytes Lion, 8-bit momentum (one state per parameter)", "lion_8bit",
                  "bitsandbytes", "bitsandbytes"),
    OptimizerInfo("lion_32bit", "bitsandbytes Lion, 32-bit momentum", "lion_32bit", "bitsandbytes", "bitsandbytes"),
    OptimizerInfo("paged_lion_8bit", "bitsandbytes Lion, 8-bit momentum in paged memory", "paged_lion_8bit",
                  "bitsandbytes", "bitsandbytes", needs_cuda=True),
    OptimizerInfo("galore_adamw", "GaLore: AdamW on low-rank projected gradients of linear weights",
                  "galore_adamw", "galore_torch", "galore-torch", low_rank=True),
    OptimizerInfo("galore_adamw_8bit", "GaLore with 8-bit AdamW states", "galore_adamw_8bit", "galore_torch",
                  "galore-torch", low_rank=True, needs_cuda=True),  # galore-torch's 8-bit path asserts CUDA
    OptimizerInfo("galore_adafactor", "GaLore with Adafactor", "galore_adafactor", "galore_torch", "galore-torch",
                  low_rank=True),
    OptimizerInfo("apollo_adamw", "APOLLO: AdamW-level updates from random-projection channel-wise scaling",
                  "apollo_adamw", "apollo_torch", "apollo-torch", low_rank=True),
    # APOLLO-Mini (Zhu et al., 2024, Sec. 4): rank 1, tensor-wise scaling, scale factor 128.
    OptimizerInfo("apollo_mini", "APOLLO-Mini: rank-1 APOLLO with tensor-wise scaling (SGD-like memory)",
                  "apollo_adamw", "apollo_torch", "apollo-torch", optim_args="rank=1,proj=random,scale_type=tensor,"
                  "scale=128", low_rank=True),
    OptimizerInfo("spam", "SPAM: Adam with spike-aware gradient clipping and periodic momentum reset",
                  package="pytorch_optimizer", pip="pytorch-optimizer", external="pytorch_optimizer:SPAM"),
    OptimizerInfo("stable_spam", "Stable-SPAM: SPAM with adaptive spike clipping and norm scaling",
                  package="pytorch_optimizer", pip="pytorch-optimizer", external="pytorch_optimizer:StableSPAM"),
    OptimizerInfo("q_galore_adamw_8bit", "Q-GaLore: GaLore with INT4 projections, adaptive subspace updates and "
                  "8-bit Adam states", package="q_galore_torch", pip="q-galore-torch",
                  external="qft.optim:QGaLoreFactory", needs_cuda=True),  # its step calls torch.cuda.synchronize
    OptimizerInfo("adafactor", "Adafactor: factored second moments (transformers' implementation)", "adafactor"),
    OptimizerInfo("sgd", "plain SGD, no state", "sgd"),
)}


def transformers_names() -> set[str]:
    from transformers.training_args import OptimizerNames

    return {o.value for o in OptimizerNames}


def check_optimizer_name(name: str) -> None:
    """A one-line error for a name that is neither qft's nor transformers'; names the closest."""
    known = {"auto", *OPTIMIZERS, *transformers_names()}
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        raise QftError(f"unknown optimizer {name!r}",
                       f"did you mean {close[0]!r}?" if close else f"choose one of {', '.join(OPTIMIZERS)}")


@dataclass
class OptimizerChoice:
    """What the Trainer needs for one --optim: TrainingArguments fields, or an optimizer class and kwargs."""

    name: str
    training_args: dict = field(default_factory=dict)
    optimizer_cls_and_kwargs: tuple | None = None


def _import_external(spec: str):
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def resolve_optimizer(name: str, learning_rate: float, weight_decay: float = 0.0,
                      cuda: bool | None = None) -> OptimizerChoice:
    """Turn an --optim name into Trainer settings; a missing package or GPU is a one-line error."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if name == "auto":
        name = "paged_adamw_8bit" if cuda else "adamw_torch"
    check_optimizer_name(name)
    info = OPTIMIZERS.get(name) or OptimizerInfo(name, "transformers optimizer", trainer_optim=name)
    if info.package and importlib.util.find_spec(info.package) is None:
        raise QftError(f"--optim {name} needs the Python package {info.pip}", f"pip install {info.pip}")
    if info.needs_cuda and not cuda:
        raise QftError(f"--optim {name} needs a GPU", "on CPU use --optim adamw_8bit, lion_8bit or adamw_torch")
    if info.external:
        cls = _import_external(info.external)
        return OptimizerChoice(name, {"optim": "adamw_torch"},
                               (cls, {"lr": learning_rate, "weight_decay": weight_decay}))
    args = {"optim": info.trainer_optim}
    if info.optim_args:
        args["optim_args"] = info.optim_args
    if info.low_rank:
        args["optim_target_modules"] = LOW_RANK_TARGETS
    return OptimizerChoice(name, args)


def _tensor_bytes(obj, seen: set[int]) -> int:
    """Bytes of every tensor reachable from an optimizer state entry (dicts, lists, projector objects)."""
    if isinstance(obj, torch.Tensor):
        key = id(obj)
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):  # e.g. GaLore's projector holds its matrix
        return sum(_tensor_bytes(v, seen) for v in vars(obj).values() if isinstance(v, (torch.Tensor, dict, list)))
    return 0


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in ``optimizer.state`` (for transformers' layer-wise wrappers: all inner optimizers)."""
    inner = getattr(optimizer, "optimizer_dict", None)
    optimizers = list(inner.values()) if inner else [optimizer]
    seen: set[int] = set()
    return sum(_tensor_bytes(dict(opt.state), seen) for opt in optimizers)


class QGaLoreFactory:
    """Builds q-galore-torch's Q-GaLore 8-bit AdamW over a model (a transformers optimizer factory).

    Every trainable 2-D weight of a Linear layer other than the output head gets GaLore's projection (rank
    128, subspace refreshed every 200 steps and lazily less often once it stabilises, scale 0.25, projection
    matrices quantized to 4 bits in groups of 256: the paper's settings, at transformers' GaLore rank); every
    other trainable tensor gets plain 8-bit AdamW.
    """

    GALORE = dict(rank=128, update_proj_gap=200, scale=0.25, proj_type="std", quant=True, quant_group_size=256,
                  quant_n_bit=4, cos_threshold=0.4, gamma_proj=2, queue_size=5)

    def __call__(self, model: torch.nn.Module, lr: float = 1e-3, weight_decay: float = 0.0, **galore):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        low_rank = {id(m.weight) for m in model.modules()
                    if isinstance(m, torch.nn.Linear) and m is not head and m.weight.requires_grad}
        trainable = [p for p in model.parameters() if p.requires_grad]
        projected = [p for p in trainable if id(p) in low_rank]
        groups = [{"params": projected, **self.GALORE, **galore}] if projected else []
        rest = [p for p in trainable if id(p) not in low_rank]
        if rest:
            groups.append({"params": rest})
        return qgalore_adamw8bit_class()(groups, lr=lr, weight_decay=weight_decay)


@functools.cache
def qgalore_adamw8bit_class():
    """q-galore-torch's ``QGaLoreAdamW8bit``, constructed and updated through bitsandbytes 0.50's API."""
    from bitsandbytes.optim.optimizer import Optimizer2State
    from q_galore_torch import QGaLoreAdamW8bit

    class QGaLoreAdamW8bitBnb(QGaLoreAdamW8bit):
        def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, min_8bit_size=4096,
                     is_paged=False):
            Optimizer2State.__init__(self, "adam", params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                     optim_bits=8, min_8bit_size=min_8bit_size, is_paged=is_paged)

        def update_step(self, group, p, gindex, pindex, flag_use_float_grad=False):
            if flag_use_float_grad:
                raise NotImplementedError("Q-GaLore's INT8 weights (float_grad) are not supported by qft")
            return Optimizer2State.update_step(self, group, p, gindex, pindex)

    return QGaLoreAdamW8bitBnb


def build_optimizer(model: torch.nn.Module, name: str, learning_rate: float = 1e-3):
    """The optimizer transformers' Trainer would build for ``--optim name`` over ``model``'s trainable weights."""
    import tempfile

    from transformers import Trainer, TrainingArguments
    from transformers.trainer_optimizer import is_optimizer_factory

    choice = resolve_optimizer(name, learning_rate)
    if choice.optimizer_cls_and_kwargs is not None:
        cls, kwargs = choice.optimizer_cls_and_kwargs
        if is_optimizer_factory(cls):  # as Trainer.create_optimizer does
            return cls()(model, **kwargs)
        return cls([p for p in model.parameters() if p.requires_grad], **kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, learning_rate=learning_rate, report_to="none",
                                 use_cpu=not torch.cuda.is_available(), **choice.training_args)
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    params = kwargs.pop("params", None)
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    else:  # low-rank optimizers return param groups over all parameters; keep the trainable ones
        params = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
        params = [g for g in params if g["params"]]
    return cls(params, **kwargs)


def optimizer_state_bytes(model: torch.nn.Module, name: str, batch: dict, learning_rate: float = 1e-3) -> int:
    """Optimizer-state bytes after one step of ``--optim name`` on ``model(**batch).loss`` (runs on CPU)."""
    optimizer = build_optimizer(model, name, learning_rate)
    model.train()
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return state_bytes(optimizer)
