"""Zeroth-order training inside transformers' Trainer and TRL's SFTTrainer, without copying their loop.

``ZoTrainerMixin`` overrides three hooks: ``create_optimizer`` (``ZoSGD`` over the trainable parameters),
``training_step`` (two perturbed forwards under ``no_grad``, the projected gradient recorded in the
optimizer) and ``log`` (adds ``projected_grad``). Gradient accumulation, LR schedules, logging, evaluation
and checkpointing are the Trainer's own.

    from qft.zo import ZoSFTTrainer, ZoArguments
    trainer = ZoSFTTrainer(model=model, args=SFTConfig(..., learning_rate=1e-6), zo=ZoArguments(eps=1e-3), ...)

Multi-GPU: every rank derives the same seed from the optimizer's step counter; each rank computes the
loss difference on its own shard of the batch and one scalar is all-reduced (averaged), so all ranks apply
the identical update and the weights stay identical without any parameter communication. So the model
is not wrapped in DDP (:func:`_prepare_without_ddp`): DDP would only add gradient buckets as large as the
trainable weights, and a collective before every forward.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from transformers import Trainer

from qft import distributed
from qft.errors import QftError
from qft.io import publishing
from qft.zo.optimizer import ZoSGD
from qft.zo.spsa import DISTRIBUTIONS, MaskFn, perturbed, perturbed_pair, release


@dataclass
class ZoArguments:
    eps: float = field(default=1e-3, metadata={"help": "Perturbation scale ε."})
    samples: int = field(default=1, metadata={"help": "Directions q per step (the update averages them); with "
                                                      "paired=True, all q in one forward of the batch 2q times."})
    objective: Callable | None = field(default=None, metadata={
        "help": "objective(model, inputs) -> scalar tensor to MINIMISE, e.g. minus accuracy; default: the LM loss."})
    mask_fn: MaskFn | None = field(default=None, metadata={"help": "Restrict z to entries (Sparse-MeZO)."})
    distribution: str = field(default="gaussian", metadata={
        "help": "z's distribution: 'gaussian' (MeZO), 'rademacher' (±1, classic SPSA) or 'rank1' (u·vᵀ per "
                "weight matrix, applied by forward hooks without copying the weights; qft.zo.lowrank)."})

    paired: bool = field(default=False, metadata={
        "help": "Both perturbed forwards as one forward of the batch twice (rank1 directions: a sign per row; other "
                "tensors: their module runs once per half). Half the Python and launches a step, which bound a small "
                "model's step on a GPU; needs the LM loss or an objective with .halves (the label-word one)."})

    defer: int = field(default=1, metadata={
        "help": "rank1 only: write the weight matrices' rank-one updates every K steps; in between the perturbed "
                "forwards take them in the same hooks' products (qft.zo.defer). One pass over every weight per K "
                "steps instead of one a step (at the Llama-3-8B shape on an H200 not yet faster: see the README)."})

    def __post_init__(self):
        if not self.eps > 0:
            raise QftError(f"zo eps must be positive, got {self.eps}", "pass e.g. --zo-eps 1e-3")
        if self.distribution not in DISTRIBUTIONS:
            raise QftError(f"unknown zo distribution {self.distribution!r}", f"pass one of {', '.join(DISTRIBUTIONS)}")
        if self.paired and self.objective is not None and not hasattr(self.objective, "halves"):
            raise QftError("--zo-paired needs each half's objective from one forward, which this objective does not give",
                           "use the LM loss or --zo-objective label-words, or leave --zo-paired off")
        if self.samples < 1:
            raise QftError(f"zo samples must be at least 1, got {self.samples}", "pass --zo-samples 1 or more")
        if self.defer > 1 and (self.distribution != "rank1" or self.mask_fn is not None):
            raise QftError("--zo-defer keeps rank-one updates pending: it needs --zo-distribution rank1 and no mask",
                           "pass --zo-distribution rank1 (not with --sparse-mezo-inplace), or leave --zo-defer at 1")
        if self.samples > 1 and getattr(self.mask_fn, "in_kernel", False):  # qft.zo.mask.MagnitudeMask
            raise QftError("a magnitude mask recomputed from the weights takes one direction a step (a second "
                           "direction's update would see weights the first one moved)", "pass --zo-samples 1")


def _all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def _prepare_without_ddp(prepare_model, model, device_placement=None, evaluation_mode=False):
    """accelerate's ``prepare_model`` (device placement, autocast) without the DDP wrapper, for ZO training.

    Rank 0's trainable weights are broadcast once, as DDP does at wrapping, so that ranks start identical
    even when an adapter was initialised randomly on each.
    """
    model = prepare_model(model, device_placement=device_placement, evaluation_mode=True)
    if not evaluation_mode and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for p in model.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)
    return model


def _check_all_used(seen: set, params) -> None:
    if len(seen) < len(params):
        missing = len(params) - len(seen)
        raise QftError(f"{missing} of {len(params)} trainable tensors were not used by their modules' forward, "
                       "so zeroth-order training cannot perturb them",
                       "freeze them (requires_grad=False) or tune another parameter set")


def zo_projected_grad(model, params, step_seed: int, eps: float, loss_fn, mask_fn: MaskFn | None = None,
                      dist: str = "gaussian", pending=None):
    """(g, mean loss) for one direction: two perturbed forwards; g is all-reduced across ranks. ``pending``: the
    optimizer's deferred updates (``ZoSGD.deferred``), which the forwards see."""
    with torch.no_grad():
        with perturbed(model, params, step_seed, +eps, mask_fn, dist, pending) as seen:
            loss_plus = loss_fn().detach().double()
        _check_all_used(seen, params)
        with perturbed(model, params, step_seed, -eps, mask_fn, dist, pending):
            loss_minus = loss_fn().detach().double()
    g = _all_reduce_mean((loss_plus - loss_minus) / (2 * eps))
    return g, (loss_plus + loss_minus) / 2


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
                "pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin")


def is_weightless(checkpoint) -> bool:
    """Whether a Trainer checkpoint folder holds no model weights (as kept from a ZO run: its optimizer state)."""
    return not any((Path(checkpoint) / name).exists() for name in WEIGHT_FILES)


def rebuild_checkpoint_weights(trainer, checkpoint, log=print) -> None:
    """Give a weightless checkpoint its weights again, for ``trainer.train(resume_from_checkpoint=checkpoint)``.

    A ZO run's optimizer state holds every step's seeds, projected gradients and rates (:class:`ZoSGD`), so the
    trainer's optimizer replays them onto the model the trainer holds (the run's starting weights: the same model,
    method and options) and the model is saved into the folder, file by file atomically. Bit-exact on the kind of
    device the run trained on; the same directions must be drawn, so also the same ``--zo-distribution`` and mask."""
    path = Path(checkpoint)
    state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu") if (
        path / "optimizer.pt").exists() else {}
    history = state.get("zo", {}).get("history")
    optimizer = trainer.create_optimizer() if history else None
    optimizer = getattr(optimizer, "optimizer", optimizer)
    if not history or not isinstance(optimizer, ZoSGD):
        raise QftError(f"checkpoint {path} holds no model weights, and no zeroth-order history to rebuild them from",
                       "resume from a checkpoint saved with its weights (a ZO run's can be rebuilt, with its method)")
    log(f"rebuilding the weights of {path.name} from its {len(history)} zeroth-order steps")
    optimizer.replay(history)
    if distributed.is_main_process():
        with publishing(path, "rebuilt weights") as staging:
            trainer.model.save_pretrained(staging)
    distributed.barrier()


CE_CHUNK_BYTES = 2**28  # float32 logits per cross-entropy piece of lm_loss_halves


def lm_loss_halves(model, inputs, batch: int) -> torch.Tensor:
    """The causal-LM loss (mean over each half's labelled tokens, as transformers computes it) of rows [0, batch)
    and of the rest (of each block of ``batch`` rows, when the batch is there more than twice), from one forward.

    The cross-entropy runs over pieces of rows, each piece's logits upcast to float32 on their own (at most
    ``CE_CHUNK_BYTES``, one row at least): transformers upcasts the whole batch's logits, which for the doubled batch
    of a Llama-3-8B shape (8 x 512 tokens, 128k words) would be 2 GiB of float32 logits and as much again for
    their log-softmax, above the inference peak that a paired step must stay near."""
    labels = inputs["labels"]
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).logits
    shifted = labels[:, 1:]
    rows, width = shifted.shape
    per_row = max(1, CE_CHUNK_BYTES // max(1, width * logits.shape[-1] * 4))
    sums = []
    for r in range(0, rows, per_row):
        piece = logits[r:r + per_row, :-1].float()
        sums.append(torch.nn.functional.cross_entropy(piece.reshape(-1, piece.shape[-1]),
                                                      shifted[r:r + per_row].reshape(-1), ignore_index=-100,
                                                      reduction="none").view(-1, width).sum(1))
        del piece
    sums = torch.cat(sums)
    valid = (shifted != -100).sum(1)
    return torch.stack([sums[h].sum() / valid[h].sum().clamp(min=1)
                        for h in (slice(b, b + batch) for b in range(0, rows, batch))])


def zo_projected_grad_paired(model, params, step_seed, eps: float, inputs: dict, halves,
                             mask_fn: MaskFn | None = None, dist: str = "gaussian", pending=None):
    """:func:`zo_projected_grad` from one forward of the batch twice (:func:`qft.zo.spsa.perturbed_pair`);
    ``halves(model, repeated_inputs, batch)`` gives the objective of each block of ``batch`` rows.

    ``step_seed`` may be a list of q seeds: the forward then takes the batch 2q times, and g is the q projected
    gradients (a tensor), one a direction; the loss is the mean over all 2q blocks."""
    seeds = [step_seed] if isinstance(step_seed, int) else list(step_seed)
    first = next(v for v in inputs.values() if torch.is_tensor(v) and v.dim())
    batch, seq = first.shape[0], first.shape[1] if first.dim() > 1 else None
    repeated = {k: torch.cat([v] * (2 * len(seeds))) if torch.is_tensor(v) and v.dim() and v.shape[0] == batch else v
                for k, v in inputs.items()}
    with torch.no_grad(), perturbed_pair(model, params, seeds, eps, batch, mask_fn, dist, seq, pending) as seen:
        losses = halves(model, repeated, batch).detach().double().reshape(-1)
    _check_all_used(seen, params)
    if losses.numel() != 2 * len(seeds):
        raise QftError(f"the objective's halves gave {losses.numel()} losses for {2 * len(seeds)} blocks of rows "
                       f"({len(seeds)} directions a step)", "make .halves return one loss per block of `batch` rows "
                       "(e.g. losses.view(-1, batch).mean(1)), or pass --zo-samples 1")
    g = _all_reduce_mean((losses[0::2] - losses[1::2]) / (2 * eps))
    return (g[0] if isinstance(step_seed, int) else g), losses.mean()


class ZoTrainerMixin:
    """Mix in before a Trainer class: ``class MyZo(ZoTrainerMixin, SFTTrainer)``."""

    def __init__(self, *args, zo: ZoArguments | None = None, **kwargs):
        self.zo = zo or ZoArguments()
        self._zo_last_g: list[float] = []
        super().__init__(*args, **kwargs)
        # there are no gradients to clip; the projected gradient is logged instead
        self.args.max_grad_norm = 0.0
        from qft.robust import NanGuard

        for callback in self.callback_handler.callbacks:  # nor any to scan for NaN every step
            if isinstance(callback, NanGuard):
                callback.gradients = False
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
            self.accelerator.prepare_model = functools.partial(_prepare_without_ddp, self.accelerator.prepare_model)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            params = [p for p in self.model.parameters() if p.requires_grad]
            if not params:
                raise QftError("the model has no trainable parameters for zeroth-order training",
                               "leave requires_grad on the parameters to tune (or wrap the model with a peft config)")
            self.optimizer = ZoSGD(params, lr=self.args.learning_rate, weight_decay=self.args.weight_decay,
                                   seed=self.args.seed, mask_fn=self.zo.mask_fn, dist=self.zo.distribution,
                                   defer=self.zo.defer)
            if self.optimizer.deferred is not None:
                self._zo_write_before_reads(self.optimizer)
        return self.optimizer

    def _zo_write_before_reads(self, opt: ZoSGD) -> None:
        """Deferred updates (``--zo-defer``) are written before anything but a ZO forward reads the weights: a
        pre-hook on each module that holds a deferred matrix (evaluation, generation, a callback's forward) and one
        on the model's state_dict (every save); checkpoints and the end of training write them too."""

        def write(*_):
            if opt.deferred is not None and not opt.deferred.active:
                opt.flush()

        for handle in getattr(self, "_zo_write_hooks", ()):  # an earlier optimizer's
            handle.remove()
        deferred = {id(opt.params[i]) for i in opt.deferred.which}
        holders = [m for m in self.model.modules() if any(id(p) in deferred for p in m.parameters(recurse=False))]
        self._zo_write_hooks = [m.register_forward_pre_hook(write) for m in holders]
        self._zo_write_hooks.append(self.model.register_state_dict_pre_hook(write))

    def _zo_flush(self) -> None:
        opt = getattr(self.optimizer, "optimizer", self.optimizer)
        if isinstance(opt, ZoSGD):
            opt.flush()

    def _save_checkpoint(self, *args, **kwargs):
        self._zo_flush()  # the checkpoint's weights hold every update its optimizer state lists
        return super()._save_checkpoint(*args, **kwargs)

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self._zo_flush()
            for model in (self.model, getattr(self, "model_wrapped", None)):  # the ZO forwards' hooks
                if model is not None:
                    release(model)

    def _zo_loss(self, model, inputs):
        if self.zo.objective is not None:
            return self.zo.objective(model, inputs)
        if "labels" in inputs:
            # the model's own forward and loss: every module runs its forward (TRL's fused LM head reads the head's
            # weight directly, which the per-module perturbation would not see)
            return model(**inputs, use_cache=False).loss
        return self.compute_loss(model, inputs)

    @staticmethod
    def _lm_halves(model, inputs, batch):
        if "labels" not in inputs:
            raise QftError("--zo-paired needs labelled batches (the LM loss of each half)",
                           "leave --zo-paired off, or pass an objective with .halves")
        return lm_loss_halves(model, inputs, batch)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if model.training:  # dropout off: both forwards must see the same function. Only when it is on: eval()
            model.eval()  # walks every module (9 ms a step on a 135M model's CPU side, which a GPU waits for)
        inputs = self._prepare_inputs(inputs)
        opt = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
        accum = self.args.gradient_accumulation_steps
        seeds = [opt.step_seed(j) for j in range(self.zo.samples)]
        if self.zo.paired:  # every direction in one forward of the batch 2q times
            halves = self.zo.objective.halves if self.zo.objective is not None else self._lm_halves
            gs, loss = zo_projected_grad_paired(model, opt.params, seeds, self.zo.eps, inputs, halves,
                                                self.zo.mask_fn, self.zo.distribution, opt.deferred)
        else:
            gs, losses = [], []
            for seed in seeds:
                g, loss = zo_projected_grad(model, opt.params, seed, self.zo.eps, lambda: self._zo_loss(model, inputs),
                                            self.zo.mask_fn, self.zo.distribution, opt.deferred)
                gs.append(g)
                losses.append(loss)
            loss = sum(losses) / len(losses)
        values = gs.tolist() if torch.is_tensor(gs) else [g.item() for g in gs]  # one host sync when paired
        for seed, g in zip(seeds, values):
            if not math.isfinite(g):
                raise QftError(f"the projected gradient became {g} at step {self.state.global_step}",
                               "lower --learning-rate, raise --zo-eps, or train in float32")
            opt.record(seed, g / (self.zo.samples * accum))
            self._zo_last_g.append(g)
        return (loss / accum).detach()

    # The Trainer's per-step bookkeeping, made to fit ZO. Each of these scans every parameter every step, which on a
    # small model is a large share of a forward-only step's CPU time (a GPU then waits for it).
    def _get_grad_norm(self, model, grad_norm=None):
        return grad_norm  # ZO keeps no gradients: no norm to measure (logged as projected_grad instead)

    def floating_point_ops(self, inputs) -> int:
        """Forward passes only: 2·N FLOPs a token per forward, two forwards per direction (the Trainer counts
        6·N for a forward and a backward). N is counted once."""
        ids = inputs.get(getattr(self.model, "main_input_name", "input_ids"))
        if ids is None:
            return 0
        if getattr(self, "_zo_flops_params", None) is None:
            count = getattr(self.model, "num_parameters", None)
            self._zo_flops_params = (count(exclude_embeddings=True) if count is not None
                                     else sum(p.numel() for p in self.model.parameters()))
        return 4 * self.zo.samples * ids.numel() * self._zo_flops_params

    def log(self, logs, *args, **kwargs):
        if self._zo_last_g and "loss" in logs:
            logs["projected_grad"] = sum(abs(g) for g in self._zo_last_g) / len(self._zo_last_g)
            self._zo_last_g.clear()
        return super().log(logs, *args, **kwargs)


class ZoTrainer(ZoTrainerMixin, Trainer):
    """transformers' Trainer, trained by MeZO."""


def zo_sft_trainer_cls():
    """TRL's SFTTrainer with MeZO (built lazily: importing TRL is slow)."""
    from trl import SFTTrainer

    class ZoSFTTrainer(ZoTrainerMixin, SFTTrainer):
        pass

    return ZoSFTTrainer
