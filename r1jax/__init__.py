"""r1jax: the DeepSeek-R1 training stack on JAX.

``load``, ``generate`` and ``export_hf`` are imported lazily so that light modules (rewards, configs) stay cheap
to import in worker processes.
"""

__all__ = ["export_hf", "generate", "load"]
__version__ = "0.1.0"


def __getattr__(name):
    if name in ("load", "export_hf"):
        from r1jax import checkpoint

        return getattr(checkpoint, name)
    if name == "generate":
        from r1jax.rollout import generate

        return generate
    raise AttributeError(f"module 'r1jax' has no attribute {name!r}")
