"""Composes qft's commands into one typer app, and turns user errors into one-line messages."""

from __future__ import annotations

import os
import sys

import typer

from qft.cli import bench, finetune, methods, quantize
from qft.cli import eval as eval_cmd, export, merge, push

app = typer.Typer(
    name="qft",
    help="Memory-efficient fine-tuning of Hugging Face LLMs: QLoRA, PEQA, QST, SpIEL, MeZO, Sparse-MeZO.\n\n"
         "Start with `qft finetune` (no arguments: a small offline demo), then `qft finetune --help`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _quiet_libraries() -> None:
    """qft prints its own progress; the libraries' own bars and advice would bury it."""
    import datasets
    import transformers

    import huggingface_hub

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    huggingface_hub.utils.logging.set_verbosity_error()  # its retry warnings would bury the one error line
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


app.command("finetune", help=finetune.__doc__)(finetune.finetune_command)
app.command("methods", help=methods.__doc__)(methods.methods_command)
app.command("bench", help=bench.__doc__)(bench.bench_command)
app.command("quantize", help=quantize.__doc__)(quantize.quantize_command)
app.command("eval", help=eval_cmd.__doc__)(eval_cmd.eval_command)
app.command("merge", help=merge.__doc__)(merge.merge_command)
app.command("export", help=export.__doc__)(export.export_command)
app.command("push", help=push.__doc__)(push.push_command)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(app())


if __name__ == "__main__":
    main()
