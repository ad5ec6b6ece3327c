"""QstModel: the peft tuner that puts a QST side network beside a causal LM and reroutes its decoder.

Not a per-layer injection: ``inject_adapter`` attaches one ``QstLayer`` as ``model.qst_side`` (so peft's
state-dict filtering saves only the side network) and replaces the forward of the model's decoder
(``model.get_decoder()``, an instance attribute) with ``qst_decoder_forward``:

1. the decoder's own forward runs under ``torch.no_grad()`` with ``output_hidden_states=True``: no backbone
   activation is kept for backward and no backbone parameter can get a gradient;
2. the side network turns those hidden states into a new ``last_hidden_state``, which is what the model's
   own head code (LM head, logit soft-capping, loss, ``logits_to_keep``) and TRL's fused LM head read.

So the causal LM's forward, ``generate`` and SFTTrainer's fused loss all go through the side network without
qft copying any of them. Generation recomputes the LLM and the side network over the whole sequence at every
new token (no KV cache: the side network would need its own); QST sets ``generation_config.use_cache=False``.
That is quadratic in the generated length: fine for evaluation-sized outputs, slow for long ones.
"""

from __future__ import annotations

import functools

import torch
from peft.tuners.tuners_utils import BaseTuner

from qft.adapters.qst.layer import QstLayer, SideNetwork
from qft.errors import QftError

# Decoder-only families whose decoder (``get_decoder()``) returns per-layer hidden states and whose head reads
# the decoder's ``last_hidden_state``. Others may work but have not been checked.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt2", "opt")


def check_supported(model) -> None:
    """Raise a one-line QftError unless ``model`` is a decoder-only causal LM of a checked family."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    if config is None or getattr(config, "is_encoder_decoder", False) or model_type not in SUPPORTED_MODEL_TYPES:
        kind = "an encoder-decoder model" if getattr(config, "is_encoder_decoder", False) else f"model type {model_type!r}"
        raise QftError(f"QST does not support {kind} ({type(model).__name__})",
                       f"use a decoder-only causal LM of a supported family: {supported}")
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if decoder is None or decoder is model or head is None:
        raise QftError(f"{type(model).__name__} has no separate decoder and LM head for QST to read",
                       f"use an AutoModelForCausalLM of a supported family: {supported}")


def qst_decoder_forward(decoder, layer: QstLayer, *args, **kwargs):
    """The decoder's forward with the side network on top (see the module docstring)."""
    class_forward = type(decoder).forward
    active = [] if layer.disable_adapters else [a for a in layer.active_adapters if a in layer.qst_net]
    if not active:
        return class_forward(decoder, *args, **kwargs)
    if len(active) > 1:
        raise QftError(f"QST runs one side network at a time, {len(active)} adapters are active",
                       "activate one with model.set_adapter(name)")
    # generate(use_cache=True) would next pass one token only (transformers < 5.24 names the cache
    # `past_key_values`, 5.24 `cache`)
    if kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:
        raise QftError("QST recomputes the whole sequence and cannot continue from a KV cache",
                       "call generate(..., use_cache=False), the default once QST is applied")
    wants_hidden = kwargs.pop("output_hidden_states", None)
    kwargs.pop("past_key_values", None)
    kwargs.pop("cache", None)
    kwargs.update(use_cache=False, output_hidden_states=True, return_dict=True)
    with torch.no_grad():
        out = class_forward(decoder, *args, **kwargs)
    mask = kwargs.get("attention_mask")
    mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None  # else: causal only
    out.last_hidden_state = layer.qst_net[active[0]](out.hidden_states, out.last_hidden_state, mask)
    if not wants_hidden:
        out.hidden_states = None
    return out


class QstModel(BaseTuner):
    """peft tuner for QST; built by ``get_peft_model(model, QstConfig(...))``."""

    prefix = "qst_"
    tuner_layer_cls = QstLayer
    target_module_mapping: dict = {}

    def inject_adapter(self, model, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        config = self.peft_config[adapter_name]
        check_supported(model)
        decoder, head = model.get_decoder(), model.get_output_embeddings()
        hidden = model.config.get_text_config().hidden_size
        num_layers = model.config.get_text_config().num_hidden_layers
        net = SideNetwork(hidden, head.in_features, num_layers, config).to(head.weight.device)
        if getattr(model, "qst_side", None) is None:
            model.qst_side = QstLayer()
            # an instance attribute, so every caller of the decoder gets it; a partial, so deepcopy re-binds it
            decoder.forward = functools.partial(qst_decoder_forward, decoder, model.qst_side)
            gen = getattr(model, "generation_config", None)
            if gen is not None:
                model.qst_side.use_cache_before = gen.use_cache
                gen.use_cache = False
        model.qst_side.update_layer(adapter_name, net)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
        self._mark_only_adapters_as_trainable(model)

    # peft's per-module injection path is not used (inject_adapter is overridden); these satisfy the ABC.
    @staticmethod
    def _check_target_module_exists(peft_config, key: str) -> bool:
        return False

    def _create_and_replace(self, *args, **kwargs) -> None:
        raise NotImplementedError("QST attaches one side network; it replaces no module")

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """'...qst_side.qst_net.<adapter>.blocks.0.qkv.weight' -> '...qst_side.qst_net.blocks.0.qkv.weight'."""
        return key.replace(f".qst_net.{adapter_name}.", ".qst_net.", 1)

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names=None):
        if merge:
            raise QftError("a QST side network cannot be merged into the LLM's weights",
                           "keep the model wrapped (PeftModel) for inference, or use unload() to drop the side network")
        layer = getattr(self.model, "qst_side", None)
        if layer is not None:
            gen = getattr(self.model, "generation_config", None)
            if gen is not None and hasattr(layer, "use_cache_before"):
                gen.use_cache = layer.use_cache_before
            del self.model.qst_side
            self.model.get_decoder().__dict__.pop("forward", None)  # back to the class's forward
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model
