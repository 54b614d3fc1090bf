"""r1jax: the DeepSeek-R1 training stack on JAX."""

from r1jax.api import export_hf, generate, load

__all__ = ["export_hf", "generate", "load"]
__version__ = "0.1.0"
