"""Sparse-MeZO (Liu et al., 2024, arXiv:2402.15751) as a PEFT method: MeZO on each layer's small weights.

    model = peft.get_peft_model(base, qft.SparseMezoConfig(density=0.2))
    trainer = qft.zo.trainer.zo_sft_trainer_cls()(model=model, args=SFTConfig(learning_rate=1e-6, ...), ...)

``qft finetune --method sparse-mezo --density 0.2`` does the same from the command line.
"""

from __future__ import annotations

from qft.adapters import MethodPlan
from qft.adapters.sparse_mezo.config import SparseMezoConfig
from qft.adapters.sparse_mezo.layer import SparseMezoLinear
from qft.adapters.sparse_mezo.model import SparseMezoModel
from qft.errors import QftError
from qft.registry import register_method

register_method(name="sparse_mezo", config_cls=SparseMezoConfig, model_cls=SparseMezoModel)

__all__ = ["SparseMezoConfig", "SparseMezoLinear", "SparseMezoModel", "plan"]


def parse_fraction(spec: str | None, default: float) -> float:
    if spec is None:
        return default
    try:
        value = float(spec)
    except ValueError:
        raise QftError(f"--density {spec!r} is not a number", "pass a fraction such as 0.2") from None
    if not 0 < value < 1:
        raise QftError(f"--density must be in (0, 1) for Sparse-MeZO, got {value}", "pass a fraction such as 0.2")
    return value


def plan(cfg) -> MethodPlan:
    from qft.adapters.mezo import zo_plan
    from qft.adapters.qlora import lora_targets

    config = SparseMezoConfig(density=parse_fraction(cfg.density, 0.2), target_modules=lora_targets(cfg.target_modules),
                              task_type="CAUSAL_LM")
    if getattr(cfg, "sparse_mezo_inplace", False):
        return inplace_plan(zo_plan(cfg, None), config)
    return zo_plan(cfg, config)


def target_weights(model, config: SparseMezoConfig) -> list:
    """The weights of the linear layers ``config`` targets in ``model``, chosen as peft chooses them for the adapter
    ('all-linear': every linear layer but the output layer)."""
    import copy

    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists
    from torch import nn

    config = _maybe_include_all_linear_layers(copy.copy(config), model)
    return [m.weight for name, m in model.named_modules()
            if name and type(m) is nn.Linear and check_target_module_exists(config, name)]


def inplace_plan(zo: MethodPlan, config: SparseMezoConfig) -> MethodPlan:
    """``--sparse-mezo-inplace``: the ZO plan over the whole model (saved whole), with only the targeted weights
    trainable and :class:`qft.zo.mask.MagnitudeMask` as the mask: no delta tensors, inference memory. The mask is
    handed to the trainer now and gets its thresholds from the starting weights once they are loaded."""
    import dataclasses
    import functools

    from qft.zo.mask import MagnitudeMask

    mask = MagnitudeMask(density=config.density)
    args = dataclasses.replace(zo.trainer_cls.keywords["zo"], mask_fn=mask)  # checks what the mask refuses

    def after_load(model):
        mats = target_weights(model, config)
        if not mats:
            raise QftError(f"--target-modules {config.target_modules!r} match no float linear layer of the model",
                           "pass names of its linear layers (e.g. q_proj,v_proj) or 'all-linear'")
        chosen = {id(p) for p in mats}
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
        mask.build(mats)

    return dataclasses.replace(zo, trainer_cls=functools.partial(zo.trainer_cls.func, zo=args), after_load=after_load)
