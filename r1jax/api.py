"""Public entry points: ``load``, ``generate``, ``export_hf`` (filled in by checkpoint and sampling modules)."""

from r1jax.checkpoint import export_hf, load
from r1jax.sampling import generate

__all__ = ["export_hf", "generate", "load"]
