"""qft: memory-efficient fine-tuning methods for Hugging Face LLMs, as PEFT methods."""

__version__ = "0.1.0"

from qft.registry import register_method, registered_methods  # noqa: E402

__all__ = ["register_method", "registered_methods", "__version__"]
