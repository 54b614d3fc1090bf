"""Pallas kernels: flash attention (training/prefill) and absorbed-MLA decode, each with a jnp reference.

`interpret=None` everywhere means: interpret on CPU, compile on TPU (Mosaic) or GPU (Triton).
"""

from .flash_attention import BlockSizes, flash_attention, flash_attention_reference
from .mla_decode import MLADecodeBlockSizes, mla_decode, mla_decode_reference

__all__ = [
    "BlockSizes",
    "MLADecodeBlockSizes",
    "flash_attention",
    "flash_attention_reference",
    "mla_decode",
    "mla_decode_reference",
]
