"""Multi-token prediction: layer ``num_hidden_layers`` of a V3 checkpoint, checked against transformers' own
decoder layer and norms wired as DeepSeek-V3 section 2.2 describes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import torch
from safetensors.torch import load_file, save_file

import r1jax
from r1jax.model import MOE_LAYERS, forward, mtp_logits, mtp_loss, mtp_mask
from tests import hf_tiny


def _with_mtp_layer(tmp_path):
    src = tmp_path / "v3"
    ref = hf_tiny.build("deepseek_v3", str(src))
    cfg = ref.config
    n = cfg.num_hidden_layers
    torch.manual_seed(1)
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

    layer = DeepseekV3DecoderLayer(cfg, layer_idx=n).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.1) if p.ndim > 1 else p.copy_(1 + 0.1 * torch.randn_like(p))
        layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    d = cfg.hidden_size
    extra = {
        "enorm.weight": 1 + 0.1 * torch.randn(d),
        "hnorm.weight": 1 + 0.1 * torch.randn(d),
        "eh_proj.weight": 0.1 * torch.randn(d, 2 * d),
        "shared_head.norm.weight": 1 + 0.1 * torch.randn(d),
        "embed_tokens.weight": ref.model.embed_tokens.weight.detach().clone(),
        "shared_head.head.weight": ref.lm_head.weight.detach().clone(),
    }
    state = load_file(src / "model.safetensors")
    state |= {f"model.layers.{n}.{k}": v.contiguous() for k, v in layer.state_dict().items()}
    # transformers 5 keeps experts fused in memory; write the per-expert hub names like save_pretrained does
    fused = {k: v for k, v in state.items() if f"layers.{n}.mlp.experts." in k}
    for k in fused:
        state.pop(k)
    gate_up, down = (
        fused[f"model.layers.{n}.mlp.experts.gate_up_proj"],
        fused[f"model.layers.{n}.mlp.experts.down_proj"],
    )
    f = cfg.moe_intermediate_size
    for e in range(cfg.n_routed_experts):
        state[f"model.layers.{n}.mlp.experts.{e}.gate_proj.weight"] = gate_up[e, :f].contiguous()
        state[f"model.layers.{n}.mlp.experts.{e}.up_proj.weight"] = gate_up[e, f:].contiguous()
        state[f"model.layers.{n}.mlp.experts.{e}.down_proj.weight"] = down[e].contiguous()
    state |= {f"model.layers.{n}.{k}": v for k, v in extra.items()}
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    conf = json.loads((src / "config.json").read_text())
    assert conf["num_nextn_predict_layers"] == 1
    return str(src), ref, layer, extra


def test_mtp_matches_reference_and_trains(tmp_path):
    path, ref, layer, extra = _with_mtp_layer(tmp_path)
    plain = r1jax.load(path)  # MTP tensors are skipped by default
    assert "mtp" not in plain.param_dict()
    model = r1jax.load(path, mtp=True)
    params = model.param_dict()
    tokens = np.random.RandomState(0).randint(3, 96, (2, 10))

    logits, aux = forward(params, jnp.asarray(tokens), model.cfg, return_hidden=True)
    got = np.asarray(mtp_logits(params, aux["hidden"], jnp.asarray(tokens), model.cfg))[0]

    eps = ref.config.rms_norm_eps

    def norm(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    with torch.no_grad():
        out = ref.model(torch.tensor(tokens), output_hidden_states=True)
        # the main model's last hidden state before the final norm: rerun the last decoder layer
        pre = ref.model.layers[-1](
            out.hidden_states[-2],
            position_embeddings=ref.model.rotary_emb(out.hidden_states[-2], torch.arange(10)[None]),
            attention_mask=None,
        )
        pre = pre[0] if isinstance(pre, tuple) else pre
        emb = ref.model.embed_tokens(torch.tensor(tokens[:, 1:]))
        x = torch.cat([norm(emb, extra["enorm.weight"]), norm(pre[:, :-1], extra["hnorm.weight"])], -1)
        x = x @ extra["eh_proj.weight"].T
        from transformers.masking_utils import create_causal_mask

        mask = create_causal_mask(
            config=ref.config, inputs_embeds=x, attention_mask=None, cache=None, position_ids=torch.arange(9)[None]
        )
        y = layer(x, attention_mask=mask, position_embeddings=ref.model.rotary_emb(x, torch.arange(9)[None]))
        y = y[0] if isinstance(y, tuple) else y
        want = (norm(y, extra["shared_head.norm.weight"]) @ ref.lm_head.weight.T).numpy()
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4

    targets = jnp.asarray(np.concatenate([tokens[:, 1:], tokens[:, :1]], 1))  # the last target is masked out
    mask = mtp_mask(jnp.ones(tokens.shape).at[:, -1].set(0.0), None, model.cfg.n_mtp_layers)

    def loss(p):
        _, a = forward(p, jnp.asarray(tokens), model.cfg, return_hidden=True)
        return mtp_loss(p, a["hidden"], jnp.asarray(tokens), targets, mask, model.cfg)

    value, grads = jax.value_and_grad(loss)(params)
    assert np.isfinite(value) and value > 0
    assert float(jnp.abs(grads["mtp"]["eh_proj"]).sum()) > 0
    assert float(jnp.abs(grads[MOE_LAYERS]["attn"]["kv_b"]).sum()) > 0  # flows back into the main model
