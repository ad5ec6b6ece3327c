"""Quantize a model's linear layers to 2/3/4-bit integers (PEQA's base, round-to-nearest) and save a
self-contained quantized model folder; fine-tune it with `qft finetune --method peqa --model OUT`.
With --gptq-calibration DATA, GPTQ (gptqmodel, `pip install "qft-toolkit[gptq]"`) chooses the integers from
that calibration data instead, and OUT is a gptqmodel checkpoint that PEQA reads the same way.

Examples:

  qft quantize --bits 3 --group-size 128 HuggingFaceTB/SmolLM2-135M-Instruct smollm2-3bit

  qft quantize --bits 4 --group-size 128 --gptq-calibration train.jsonl MODEL smollm2-gptq4

  qft finetune --method peqa --bits 3 --group-size 128 --model smollm2-3bit --output adapter
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from qft.cli.common import console, user_errors, with_yaml_defaults


@user_errors
def quantize_command(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Local model folder or Hub id of a float causal LM."),
    output: str = typer.Argument(..., help="Folder that receives the quantized model."),
    bits: int = typer.Option(4, "--bits", help="Integer bits per weight: 2, 3 or 4."),
    group_size: int = typer.Option(128, "--group-size", help="Input weights per group; 0 = one per output channel."),
    target_modules: str = typer.Option("all-linear", "--target-modules",
                                       help="Comma-separated linear layer names, or 'all-linear' (all but the head)."),
    dtype: str = typer.Option("auto", "--dtype", help="Float dtype of the rest of the model: auto, float32, "
                                                       "bfloat16 or float16 (auto: the checkpoint's)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a quantized model already in OUTPUT."),
    gptq_calibration: Optional[str] = typer.Option(
        None, "--gptq-calibration", help="Data file (or Hub dataset) to calibrate GPTQ on; uses gptqmodel."),
    calibration_samples: int = typer.Option(256, "--calibration-samples", help="Examples GPTQ calibrates on."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of these options; flags override it."),
) -> None:
    opts = with_yaml_defaults(ctx, config, locals())
    bits, group_size, target_modules, dtype, overwrite = (opts[k] for k in
                                                          ("bits", "group_size", "target_modules", "dtype", "overwrite"))
    from qft.adapters.qlora import lora_targets
    from qft.adapters.peqa.storage import folder_size, quantize_to_folder

    say = lambda m: console.print(m, highlight=False)  # noqa: E731
    if opts["gptq_calibration"]:
        _gptq(model, output, bits, group_size, opts["gptq_calibration"], opts["calibration_samples"], overwrite, say)
        return
    record = quantize_to_folder(model, output, bits=bits, group_size=group_size,
                                target_modules=lora_targets(target_modules), dtype=dtype, overwrite=overwrite,
                                log=say)
    size = folder_size(output)
    say(f"saved [bold]{output}[/] ({size / 2**20:.2f} MiB, {len(record['layers'])} integer layers, "
        f"{record['bits']}-bit, group size {record['group_size']})")
    say(f"fine-tune it with: qft finetune --method peqa --bits {record['bits']} "
        f"--group-size {record['group_size']} --model {output}")


def _gptq(model: str, output: str, bits: int, group_size: int, data: str, samples: int, overwrite: bool, say) -> None:
    from qft.adapters.peqa import PeqaConfig
    from qft.adapters.peqa.gptq import quantize_gptq
    from qft.data import calibration_texts
    from qft.errors import QftError
    from qft.models import resolve_model

    PeqaConfig(bits=bits, group_size=group_size)  # refuse bad settings before any slow work
    if Path(output, "config.json").exists() and not overwrite:
        raise QftError(f"{output} already holds a model", "pass --overwrite to replace it, or another folder")
    if samples < 1:
        raise QftError(f"--calibration-samples must be at least 1, got {samples}", "pass e.g. 256")
    texts = calibration_texts(data, samples)
    quantize_gptq(resolve_model(model, say), output, bits, group_size, texts)
    say(f"saved [bold]{output}[/] (GPTQ, {bits}-bit, group size {group_size}, calibrated on {len(texts)} examples)")
    say(f"fine-tune it with: qft finetune --method peqa --bits {bits} --group-size {group_size} --model {output}")
