"""raymeta: meta-training causal language models for in-context learning, on Ray."""

__version__ = "0.1.0"
__all__ = ["__version__"]
