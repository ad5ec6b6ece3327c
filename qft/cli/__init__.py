"""qft's command line: ``qft finetune``, ``qft methods``, ``qft bench``. Run ``qft --help``."""

from qft.cli.main import app, main

__all__ = ["app", "main"]
