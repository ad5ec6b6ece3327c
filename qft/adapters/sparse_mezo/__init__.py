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


def target_weights(model, config: SparseMezoConfig) -> dict:
    """{module name: weight} of the linear layers ``config`` targets in ``model``, chosen as peft chooses them for the
    adapter ('all-linear': every linear layer but the output layer)."""
    import copy

    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists
    from torch import nn

    config = _maybe_include_all_linear_layers(copy.copy(config), model)
    return {name: m.weight for name, m in model.named_modules()
            if name and type(m) is nn.Linear and check_target_module_exists(config, name)}


def tune_only(model, weights) -> None:
    """Make ``weights`` the model's only trainable tensors (what ZO then perturbs and updates)."""
    chosen = {id(p) for p in weights}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)


def checkpoint_files(source: str) -> dict:
    """{checkpoint key: the safetensors file holding it} of a local model folder or a Hub id in the local cache; empty
    when there are none (a .bin checkpoint, a model built in memory)."""
    import json
    from pathlib import Path

    path = Path(source)
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(source, local_files_only=True, allow_patterns=["*.safetensors", "*.json"]))
        except Exception:  # not cached, not a repo id: nothing to read back
            return {}
    index = path / "model.safetensors.index.json"
    if index.exists():
        return {key: path / name for key, name in json.loads(index.read_text())["weight_map"].items()}
    single = path / "model.safetensors"
    if not single.exists():
        return {}
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        return {key: single for key in f.keys()}


def inplace_plan(zo: MethodPlan, config: SparseMezoConfig) -> MethodPlan:
    """``--sparse-mezo-inplace``: the ZO plan over the whole model with only the targeted weights trainable and
    :class:`qft.zo.mask.MagnitudeMask` as the mask: no delta tensors, inference memory. The mask is handed to the
    trainer now and gets its thresholds from the starting weights once they are loaded.

    The result is saved as the PEFT method's sparse adapter: every entry that changed started under its layer's
    threshold, so the delta ``W_T - W_0`` on ``|W_0| <= h`` holds the whole change. ``W_0`` is read back from the base's
    safetensors files (checked on load, so a base without them fails before training, in one line)."""
    import dataclasses
    import functools

    from qft.zo.mask import MagnitudeMask

    mask = MagnitudeMask(density=config.density)
    args = dataclasses.replace(zo.trainer_cls.keywords["zo"], mask_fn=mask)  # checks what the mask refuses
    sources: dict[str, tuple] = {}  # module name -> (checkpoint key, file)

    def after_load(model):
        mats = target_weights(model, config)
        if not mats:
            raise QftError(f"--target-modules {config.target_modules!r} match no float linear layer of the model",
                           "pass names of its linear layers (e.g. q_proj,v_proj) or 'all-linear'")
        files = checkpoint_files(getattr(model, "name_or_path", ""))
        for name in mats:
            key = name + ".weight"
            if key not in files:
                raise QftError(f"--sparse-mezo-inplace saves its adapter against the base's safetensors files, and "
                               f"{model.name_or_path or 'this model'} has none holding {key}",
                               "leave --sparse-mezo-inplace out (the PEFT Sparse-MeZO), or save the base with "
                               "save_pretrained first")
            sources[name] = (key, files[key])
        tune_only(model, mats.values())
        mask.build(mats.values())

    def export(model, folder):
        import torch
        from peft import get_peft_model
        from safetensors import safe_open

        dtype = getattr(torch, config.delta_dtype)

        def start(name):  # W_0 of a target, read back from the base's file (the loaded base, cast as it was)
            key, path = sources[name]
            w = model.get_submodule(name).weight
            with safe_open(str(path), "pt") as f:
                return w, f.get_tensor(key).to(device=w.device, dtype=w.dtype)

        deltas = {}
        with torch.no_grad():
            for name in sources:  # every delta and check first: a failed check leaves the trained weights as they are
                w, w0 = start(name)
                selected = mask.select(w, w0)  # |W_0| <= h, the threshold the run trained with
                if not torch.equal(w[~selected], w0[~selected]):
                    raise QftError(f"{name} changed outside the entries its mask allows, or the base's file is not "
                                   "the base that trained", "report this; the trained weights were not saved")
                deltas[name] = w[selected].to(dtype) - w0[selected].to(dtype)  # row-major, as the adapter numbers them
            for name in sources:
                w, w0 = start(name)
                w.copy_(w0)
            wrapped = get_peft_model(model, config)  # on the starting weights: the same thresholds and selections
            for name, delta in deltas.items():
                wrapped.base_model.model.get_submodule(name).sparse_mezo_delta["default"].copy_(delta)
        wrapped.save_pretrained(folder)

    return dataclasses.replace(zo, trainer_cls=functools.partial(zo.trainer_cls.func, zo=args), after_load=after_load,
                               export=export)
