"""Shared Ollama Proxy: a transparent, Ollama-compatible reverse proxy for shared Ollama fleets."""

__version__ = "0.1.0"
__all__ = ["__version__"]
