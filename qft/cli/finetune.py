"""Fine-tune a model and save a peft adapter. With no arguments: SmolLM2-135M-Instruct on a generated
sentiment task, offline, a few minutes on a laptop CPU.

Examples:

  qft finetune

  qft finetune --model HuggingFaceTB/SmolLM2-135M-Instruct --data train.jsonl --method qlora --output out --max-steps 200
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer
import yaml

from qft.cli.common import console, help_of, resolve_config, user_errors
from qft.train import FinetuneConfig

H = help_of(FinetuneConfig)


@user_errors
def finetune_command(
    model: Optional[str] = typer.Option(None, "--model", help=H("model")),
    data: Optional[str] = typer.Option(None, "--data", help=H("data")),
    method: Optional[str] = typer.Option(None, "--method", help=H("method")),
    output: Optional[str] = typer.Option(None, "--output", "-o", help=H("output")),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help=H("max_steps")),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of options; flags override it."),
    learning_rate: Optional[float] = typer.Option(None, "--learning-rate", "--lr", help=H("learning_rate")),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help=H("weight_decay")),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help=H("batch_size")),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help=H("grad_accum")),
    max_length: Optional[int] = typer.Option(None, "--max-length", help=H("max_length")),
    lora_r: Optional[int] = typer.Option(None, "--lora-r", help=H("lora_r")),
    lora_alpha: Optional[int] = typer.Option(None, "--lora-alpha", help=H("lora_alpha")),
    lora_dropout: Optional[float] = typer.Option(None, "--lora-dropout", help=H("lora_dropout")),
    target_modules: Optional[str] = typer.Option(None, "--target-modules", help=H("target_modules")),
    double_quant: Optional[bool] = typer.Option(None, "--double-quant/--no-double-quant", help=H("double_quant")),
    optim: Optional[str] = typer.Option(None, "--optim", help=H("optim")),
    gradient_checkpointing: Optional[bool] = typer.Option(
        None, "--gradient-checkpointing/--no-gradient-checkpointing", help=H("gradient_checkpointing")),
    fused_kernels: Optional[bool] = typer.Option(None, "--fused-kernels/--no-fused-kernels", help=H("fused_kernels")),
    bits: Optional[int] = typer.Option(None, "--bits", help=H("bits")),
    group_size: Optional[int] = typer.Option(None, "--group-size", help=H("group_size")),
    density: Optional[str] = typer.Option(None, "--density", help=H("density")),
    reselect_every: Optional[int] = typer.Option(None, "--reselect-every", help=H("reselect_every")),
    regrow: Optional[str] = typer.Option(None, "--regrow", help=H("regrow")),
    quantize_base: Optional[bool] = typer.Option(None, "--quantize-base/--float-base", help=H("quantize_base")),
    side_reduction: Optional[int] = typer.Option(None, "--side-reduction", help=H("side_reduction")),
    downsample: Optional[str] = typer.Option(None, "--downsample", help=H("downsample")),
    side_input_norm: Optional[bool] = typer.Option(None, "--side-input-norm/--no-side-input-norm",
                                                   help=H("side_input_norm")),
    side_standardize: Optional[bool] = typer.Option(None, "--side-standardize/--no-side-standardize",
                                                    help=H("side_standardize")),
    side_uniform_attention: Optional[bool] = typer.Option(
        None, "--side-uniform-attention/--no-side-uniform-attention", help=H("side_uniform_attention")),
    side_readout: Optional[str] = typer.Option(None, "--side-readout", help=H("side_readout")),
    side_gate_init: Optional[float] = typer.Option(None, "--side-gate-init", help=H("side_gate_init")),
    side_gate_scale: Optional[float] = typer.Option(None, "--side-gate-scale", help=H("side_gate_scale")),
    zo_eps: Optional[float] = typer.Option(None, "--zo-eps", help=H("zo_eps")),
    zo_samples: Optional[int] = typer.Option(None, "--zo-samples", help=H("zo_samples")),
    zo_objective: Optional[str] = typer.Option(None, "--zo-objective", help=H("zo_objective")),
    zo_distribution: Optional[str] = typer.Option(None, "--zo-distribution", help=H("zo_distribution")),
    zo_paired: Optional[bool] = typer.Option(None, "--zo-paired/--no-zo-paired", help=H("zo_paired")),
    zo_defer: Optional[int] = typer.Option(None, "--zo-defer", help=H("zo_defer")),
    zo_adapter: Optional[str] = typer.Option(None, "--zo-adapter", help=H("zo_adapter")),
    sparse_mezo_inplace: Optional[bool] = typer.Option(None, "--sparse-mezo-inplace/--sparse-mezo-adapter",
                                                       help=H("sparse_mezo_inplace")),
    eval_steps: Optional[int] = typer.Option(None, "--eval-steps", help=H("eval_steps")),
    early_stopping_patience: Optional[int] = typer.Option(None, "--early-stopping-patience",
                                                          help=H("early_stopping_patience")),
    early_stopping_threshold: Optional[float] = typer.Option(None, "--early-stopping-threshold",
                                                             help=H("early_stopping_threshold")),
    logging_steps: Optional[int] = typer.Option(None, "--logging-steps", help=H("logging_steps")),
    save_steps: Optional[int] = typer.Option(None, "--save-steps", help=H("save_steps")),
    seed: Optional[int] = typer.Option(None, "--seed", help=H("seed")),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help=H("overwrite")),
    resume: Optional[str] = typer.Option(None, "--resume", help=H("resume")),
    allow_pickle: Optional[bool] = typer.Option(None, "--allow-pickle", help=H("allow_pickle")),
    num_gpus: Optional[int] = typer.Option(None, "--num-gpus", help=H("num_gpus")),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config as YAML and exit."),
) -> None:
    cfg = resolve_config(FinetuneConfig, config, locals())
    if print_config:
        console.print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), end="", highlight=False)
        return

    from qft import distributed
    from qft.train import finetune

    if cfg.num_gpus > 1 and not distributed.launched():  # the ranks print; this process only waits
        raise typer.Exit(distributed.launch_finetune(cfg, log=lambda m: console.print(m, highlight=False)))
    result = finetune(cfg, log=lambda m: console.print(m, highlight=False))
    if not distributed.is_main_process():
        return
    size = result.adapter_bytes
    human = f"{size / 2**20:.2f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"
    console.print(
        f"\n[bold]{result.metric_name}[/]: {result.metric_before:.4f} before -> "
        f"[bold green]{result.metric_after:.4f}[/] after ({result.stats.get('steps')} steps, "
        f"{result.seconds:.0f} s, peak memory {result.stats.get('peak_mem_gib', float('nan')):.2f} GiB)",
        highlight=False,
    )
    what = "adapter" if result.is_adapter else "model"
    console.print(f"{what} saved to [bold]{result.output}[/] ({human})", highlight=False)
    console.print("load it with:", highlight=False)
    if not result.is_adapter:
        console.print(f"  from transformers import AutoModelForCausalLM\n"
                      f"  model = AutoModelForCausalLM.from_pretrained({str(result.output)!r})", highlight=False)
        return
    if cfg.method != "qlora":
        console.print("  import qft  # registers qft's methods with peft", highlight=False)
    console.print(
        "  from transformers import AutoModelForCausalLM\n"
        "  from peft import PeftModel\n"
        f"  model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({result.base_model!r}), "
        f"{str(result.output)!r})",
        highlight=False, soft_wrap=True,
    )
