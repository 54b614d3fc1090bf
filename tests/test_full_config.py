"""The full DeepSeek-V3 671B config, from its real config.json values, via jax.eval_shape (nothing allocated)."""

import jax
import numpy as np
from r1jax.configs import v3_671b

from r1jax import hf
from r1jax.cache import cache_bytes
from r1jax.model import init_params

V3_CONFIG = v3_671b.HF_CONFIG  # deepseek-ai/DeepSeek-V3 config.json (the fields r1jax reads)


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_v3_671b_parameter_count():
    cfg = hf.config_from_hf(V3_CONFIG)
    shapes = jax.eval_shape(lambda k: init_params(cfg, k, mtp=True), jax.random.key(0))
    mtp = _count(shapes.pop("mtp"))
    main = _count(shapes)
    # published: 671B main model; HF reports 685B including the MTP module, which on disk also carries its own
    # copies of the embedding and the output head (2 x 129280 x 7168), shared in r1jax.
    assert abs(main - 671e9) / 671e9 < 0.002, main
    hf_total = main + mtp + 2 * 129280 * 7168
    assert abs(hf_total - 685e9) / 685e9 < 0.002, hf_total
    # 37B activated per token: dense parts + 8 routed + 1 shared expert per MoE layer
    routed = 58 * (256 - 8) * 3 * 7168 * 2048
    assert abs(main - routed - 37e9) / 37e9 < 0.03


def test_v3_yarn_softmax_scale_and_compressed_cache():
    from r1jax.model import rope_frequencies, softmax_scale

    cfg = hf.config_from_hf(V3_CONFIG)
    np.testing.assert_allclose(softmax_scale(cfg), 192**-0.5 * (0.1 * np.log(40) + 1) ** 2, rtol=1e-12)
    np.testing.assert_allclose(softmax_scale(cfg), 0.135234, rtol=1e-5)
    inv, attn_factor = rope_frequencies(cfg.rope, 64)
    assert attn_factor == 1.0 and inv.shape == (32,)
    # YaRN correction range for V3 is dims [10, 23]: below it frequencies are untouched, above it divided by 40
    base = 1.0 / 10000 ** (np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(inv[:10], base[:10], rtol=1e-6)
    np.testing.assert_allclose(inv[23:], base[23:] / 40, rtol=1e-6)
    # compressed MLA cache: 576 values per token per layer
    assert cache_bytes(cfg, 1, 1, "bfloat16") == 576 * 61 * 2
