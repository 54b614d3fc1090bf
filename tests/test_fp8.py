"""DeepSeek fp8 checkpoints: float8_e4m3fn weights with 128x128 ``weight_scale_inv`` block scales, ragged edges."""

import json

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import r1jax
from tests import hf_tiny

SKIP = ("embed_tokens", "lm_head", "mlp.gate.weight", "norm", "e_score_correction_bias")


def _quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 128x128 block: scale = max|w| / 448, stored fp8 = w / scale (torch's own float8 cast)."""
    rows, cols = w.shape
    br, bc = -(-rows // 128), -(-cols // 128)
    scale = torch.zeros(br, bc)
    q = torch.zeros_like(w, dtype=torch.float8_e4m3fn)
    for i in range(br):
        for j in range(bc):
            blk = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


def _dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[: q.shape[0], : q.shape[1]]
    return q.to(torch.float32) * full


def test_fp8_block_scaled_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    src = tmp_path / "bf"
    from transformers import AutoConfig

    # hidden 160, ffw 272, ranks 136: every weight has a partial 128-block at its edges
    kw = dict(hf_tiny.BASE, **hf_tiny.CASES["deepseek_v3"])
    kw |= dict(hidden_size=160, intermediate_size=272, moe_intermediate_size=136, q_lora_rank=136)
    cfg = AutoConfig.for_model("deepseek_v3", **kw)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(src)
    state = load_file(src / "model.safetensors")
    fp8_state, deq_state = {}, {}
    for k, w in state.items():
        if w.ndim == 2 and not any(s in k for s in SKIP):
            q, s = _quantize(w)
            fp8_state[k], fp8_state[k.replace(".weight", ".weight_scale_inv")] = q, s
            deq_state[k] = _dequantize(q, s)
        else:
            fp8_state[k] = deq_state[k] = w
    assert any(v.dtype == torch.float8_e4m3fn and v.shape[0] % 128 for v in fp8_state.values())  # ragged edges

    fp8_dir, ref_dir = tmp_path / "fp8", tmp_path / "ref"
    for d, st in ((fp8_dir, fp8_state), (ref_dir, deq_state)):
        d.mkdir()
        save_file(st, d / "model.safetensors", metadata={"format": "pt"})
        conf = json.loads((src / "config.json").read_text())
        if d == fp8_dir:
            conf["quantization_config"] = {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "weight_block_size": [128, 128],
                "activation_scheme": "dynamic",
            }
        (d / "config.json").write_text(json.dumps(conf))

    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    tokens = np.random.RandomState(0).randint(3, 96, (2, 9))
    got = np.asarray(r1jax.load(str(fp8_dir))(tokens))
    want = hf_tiny.hf_logits(ref, tokens)
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4
    # and the fp8 values really were used: plain (un-scaled) casting would be far off
    assert not np.allclose(got, hf_tiny.hf_logits(AutoModelForCausalLM.from_pretrained(src).eval(), tokens), atol=1e-6)
