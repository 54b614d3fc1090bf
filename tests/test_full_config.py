"""The full DeepSeek-V3 671B config, from its real config.json values, via jax.eval_shape (nothing allocated)."""

import jax
import numpy as np

from r1jax import hf
from r1jax.cache import cache_bytes
from r1jax.model import init_params

V3_CONFIG = {  # deepseek-ai/DeepSeek-V3 config.json (the fields r1jax reads)
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc",
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "hidden_act": "silu",
    "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_theta": 10000,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
}


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
