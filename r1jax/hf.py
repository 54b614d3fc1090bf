"""HuggingFace checkpoints: config.json -> ModelConfig, safetensors -> parameters and back.

The mapping is one declarative table: a row per HF key template (``{i}`` layer, ``{j}`` expert), the parameter path
it fills, and its transform. ``LINEAR``: HF stores ``[out, in]``; r1jax stores ``[in..., out...]`` (einsum layout)
so the tensor is transposed and reshaped to the parameter's declared shape (``LINEAR2``: two input axes, e.g. the
output projection ``[h, v, d]``). ``COPY``: reshaped only. Every shape is checked against the abstract parameter
tree once (``check_tensors``), before anything is read. ``HFTensors`` reads one tensor at a time, DeepSeek fp8
weights (``weight_scale_inv`` block scales) dequantised as they are read; ``write_hf`` writes one at a time.
``write_peft_adapter`` writes LoRA adapters as a PEFT adapter directory, named and laid out by the same table.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeAlias

import ml_dtypes
import numpy as np

from r1jax.config import Arch, ModelConfig, RopeConfig
from r1jax.errors import CheckpointError
from r1jax.model import DENSE_LAYERS, MOE_LAYERS, ParamSpec, param_specs
from r1jax.safetensors_io import SafetensorsFile, StreamWriter, iter_checkpoint_files, write_sharded

COPY, LINEAR, LINEAR2 = "copy", "linear", "linear2"
# ``read(path, index) -> params[path][index]``: how export and convert pull one parameter slice at a time.
ParamReader: TypeAlias = Callable[[tuple[str, ...], tuple], np.ndarray]
OPTIONAL = (".e_score_correction_bias",)  # tensors that may be absent (left at their zero init)
FP8 = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))
# fp8 -> float32 by table lookup over the 256 codes: ~3x faster than ml_dtypes' elementwise cast
_FP8_TO_F32 = {d: np.arange(256, dtype=np.uint8).view(d).astype(np.float32) for d in FP8}

ATTN_MLA = [
    ("self_attn.q_proj.weight", "attn/q", LINEAR),
    ("self_attn.q_a_proj.weight", "attn/q_a", LINEAR),
    ("self_attn.q_a_layernorm.weight", "attn/q_norm", COPY),
    ("self_attn.q_b_proj.weight", "attn/q_b", LINEAR),
    ("self_attn.kv_a_proj_with_mqa.weight", "attn/kv_a", LINEAR),
    ("self_attn.kv_a_layernorm.weight", "attn/kv_norm", COPY),
    ("self_attn.kv_b_proj.weight", "attn/kv_b", LINEAR),
    ("self_attn.o_proj.weight", "attn/o", LINEAR2),
]
ATTN_GQA = [
    ("self_attn.q_proj.weight", "attn/q", LINEAR),
    ("self_attn.k_proj.weight", "attn/k", LINEAR),
    ("self_attn.v_proj.weight", "attn/v", LINEAR),
    ("self_attn.o_proj.weight", "attn/o", LINEAR2),
    ("self_attn.q_proj.bias", "attn/q_bias", COPY),
    ("self_attn.k_proj.bias", "attn/k_bias", COPY),
    ("self_attn.v_proj.bias", "attn/v_bias", COPY),
    ("self_attn.o_proj.bias", "attn/o_bias", COPY),
    ("self_attn.q_norm.weight", "attn/q_norm", COPY),
    ("self_attn.k_norm.weight", "attn/k_norm", COPY),
]
NORMS = [
    ("input_layernorm.weight", "attn_norm", COPY),
    ("post_attention_layernorm.weight", "mlp_norm", COPY),
]
DENSE_MLP = [
    ("mlp.gate_proj.weight", "mlp/gate", LINEAR),
    ("mlp.up_proj.weight", "mlp/up", LINEAR),
    ("mlp.down_proj.weight", "mlp/down", LINEAR),
    ("mlp.gate_proj.bias", "mlp/gate_bias", COPY),
    ("mlp.up_proj.bias", "mlp/up_bias", COPY),
    ("mlp.down_proj.bias", "mlp/down_bias", COPY),
]
MOE_MLP = [
    ("mlp.gate.weight", "mlp/router", LINEAR),
    ("mlp.gate.e_score_correction_bias", "mlp/router_bias", COPY),  # optional: V2 has none (zeros)
    ("mlp.experts.{j}.gate_proj.weight", "mlp/experts/gate", LINEAR),
    ("mlp.experts.{j}.up_proj.weight", "mlp/experts/up", LINEAR),
    ("mlp.experts.{j}.down_proj.weight", "mlp/experts/down", LINEAR),
    ("mlp.shared_experts.gate_proj.weight", "mlp/shared/gate", LINEAR),
    ("mlp.shared_experts.up_proj.weight", "mlp/shared/up", LINEAR),
    ("mlp.shared_experts.down_proj.weight", "mlp/shared/down", LINEAR),
]
MTP = [
    ("enorm.weight", "enorm", COPY),
    ("hnorm.weight", "hnorm", COPY),
    ("eh_proj.weight", "eh_proj", LINEAR),
    ("shared_head.norm.weight", "head_norm", COPY),
]
GLOBAL = [
    ("model.embed_tokens.weight", "embed", COPY),
    ("model.norm.weight", "final_norm", COPY),
    ("lm_head.weight", "lm_head", LINEAR),
]
# Keys present in checkpoints that r1jax does not need: rotary buffers, the MTP module's private copies of the
# shared embedding and head.
IGNORED = re.compile(
    r".*rotary_emb\.inv_freq$|.*\.weight_scale_inv$|model\.layers\.\d+\.(embed_tokens|shared_head\.head)\."
)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor of the checkpoint: where it goes (``path`` + leading ``index`` into stacked axes)."""

    key: str
    path: tuple[str, ...]
    index: tuple[int, ...]
    transform: str


def _spec_at(specs: dict, path: tuple[str, ...]) -> ParamSpec | None:
    node = specs
    for p in path:
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node if isinstance(node, ParamSpec) else None


def _layer_rows(cfg: ModelConfig, moe_layer: bool) -> list[tuple[str, str, str]]:
    rows = NORMS + (ATTN_MLA if cfg.is_mla else ATTN_GQA)
    return rows + (MOE_MLP if moe_layer else DENSE_MLP)


def entries(cfg: ModelConfig, *, mtp: bool = False) -> list[Entry]:
    """The table expanded for ``cfg``: every HF key the parameter tree needs, nothing else."""
    specs = param_specs(cfg, mtp=mtp)
    out: list[Entry] = []

    def add(key: str, path: tuple[str, ...], index: tuple[int, ...], transform: str):
        if _spec_at(specs, path) is not None:
            out.append(Entry(key, path, index, transform))

    for key, path, tr in GLOBAL:
        add(key, (path,), (), tr)
    layers = [(DENSE_LAYERS, i, i, False) for i in range(cfg.n_dense_layers)]
    layers += [(MOE_LAYERS, cfg.n_dense_layers + i, i, True) for i in range(cfg.n_moe_layers)]
    for stack, hf_i, idx, is_moe in layers:
        for key, path, tr in _layer_rows(cfg, is_moe):
            _expand(add, f"model.layers.{hf_i}.{key}", (stack, *path.split("/")), (idx,), tr, cfg)
    if mtp:
        for k in range(cfg.n_mtp_layers):
            hf_i = cfg.n_layers + k
            for key, path, tr in MTP:
                add(f"model.layers.{hf_i}.{key}", ("mtp", path), (k,), tr)
            for key, path, tr in _layer_rows(cfg, cfg.is_moe):
                _expand(add, f"model.layers.{hf_i}.{key}", ("mtp", "block", *path.split("/")), (k,), tr, cfg)
    return out


def _expand(add, key: str, path: tuple[str, ...], index: tuple[int, ...], tr: str, cfg: ModelConfig):
    if "{j}" in key:
        for j in range(cfg.n_experts):
            add(key.format(j=j), path, (*index, j), tr)
    else:
        add(key, path, index, tr)


# --- config -----------------------------------------------------------------------------------------------------------
def _rope_from_hf(hf: dict) -> RopeConfig:
    rp = dict(hf.get("rope_parameters") or {})
    rs = dict(hf.get("rope_scaling") or {})
    merged = {**rs, **rp}
    theta = merged.get("rope_theta", hf.get("rope_theta", 10000.0))
    rtype = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rtype not in ("default", "linear", "llama3", "yarn"):
        raise CheckpointError(f"unsupported rope scaling type {rtype!r} (supported: default, linear, llama3, yarn)")
    return RopeConfig(
        theta=float(theta),
        type=rtype,
        factor=float(merged.get("factor") or 1.0),
        original_max_position=merged.get("original_max_position_embeddings"),
        beta_fast=float(merged.get("beta_fast") or 32.0),
        beta_slow=float(merged.get("beta_slow") or 1.0),
        mscale=merged.get("mscale"),
        mscale_all_dim=merged.get("mscale_all_dim"),
        attention_factor=merged.get("attention_factor"),
        truncate=bool(merged.get("truncate", True)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
    )


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """ModelConfig from a HF ``config.json`` dict (``model_type`` decides the architecture)."""
    mt = hf.get("model_type")
    try:
        arch = Arch(mt)
    except ValueError:
        raise CheckpointError(f"unknown model_type {mt!r}; r1jax supports {', '.join(a.value for a in Arch)}") from None
    eos = hf.get("eos_token_id")
    common = dict(
        arch=arch,
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads"),
        ffw=hf["intermediate_size"],
        rope=_rope_from_hf(hf),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
        pad_token_id=hf.get("pad_token_id"),
    )
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"unsupported hidden_act {hf.get('hidden_act')!r} (only silu)")
    if arch in (Arch.DEEPSEEK_V2, Arch.DEEPSEEK_V3):
        v3 = arch == Arch.DEEPSEEK_V3
        n_exp = hf.get("n_routed_experts") or 0
        fields = dict(
            q_lora_rank=hf.get("q_lora_rank"),
            kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_dim=hf["qk_nope_head_dim"],
            qk_rope_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"],
            n_experts=n_exp,
            n_shared_experts=hf.get("n_shared_experts") or 0,
            experts_per_token=hf.get("num_experts_per_tok") or 0,
            moe_ffw=hf.get("moe_intermediate_size") or 0,
            first_k_dense=hf.get("first_k_dense_replace", 0) if n_exp else hf["num_hidden_layers"],
            n_group=hf.get("n_group") or 1,
            topk_group=hf.get("topk_group") or 1,
            scoring="sigmoid" if v3 else hf.get("scoring_func", "softmax"),
            topk_method="noaux_tc" if v3 else hf.get("topk_method", "greedy"),
            # transformers' V2 router never renormalises; V3 follows the flag.
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)) if v3 else False,
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            n_mtp_layers=hf.get("num_nextn_predict_layers", 0) or 0,
            rope_interleave=bool(hf.get("rope_interleave", True)),
            qkv_bias=False,
            o_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
        )
        if hf.get("attention_bias"):
            raise CheckpointError("attention_bias=true is not supported for MLA models")
    else:
        fields = dict(
            head_dim=hf.get("head_dim"),
            qkv_bias=arch == Arch.QWEN2 or bool(hf.get("attention_bias", False)),
            o_bias=arch == Arch.LLAMA and bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=arch == Arch.QWEN3,
        )
    try:
        return ModelConfig(**common, **fields, **overrides)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json describes an invalid model: {e}") from None


def read_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{path}: no config.json (not a HuggingFace checkpoint directory)")
    try:
        return json.loads(Path(cfg_path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None


# --- tensors ----------------------------------------------------------------------------------------------------------
def dequant_fp8(w: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] = (128, 128)) -> np.ndarray:
    """DeepSeek fp8: ``W[i, j] = w[i, j] * scale_inv[i // b0, j // b1]`` (a multiply, despite the name); computed
    block row by block row so the only full-size array is the float32 result."""
    rows, cols = w.shape
    b0, b1 = block
    if scale_inv.shape != fp8_scale_shape(w.shape, block):
        raise CheckpointError(f"fp8 scale shape {scale_inv.shape} does not cover weight shape {w.shape}")
    lut = _FP8_TO_F32.get(w.dtype)
    out = np.empty(w.shape, np.float32)
    s = scale_inv.astype(np.float32)
    for i in range(s.shape[0]):
        rows = slice(i * b0, (i + 1) * b0)
        out[rows] = lut[w[rows].view(np.uint8)] if lut is not None else w[rows]  # the lookup's index temp: one block
        out[rows] *= np.repeat(s[i], b1)[:cols]
    return out


def fp8_scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def _decode_scales(s: np.ndarray, scale_fmt: str | None, where: str) -> np.ndarray:
    """Scales as float32: ``ue8m0`` scales are powers of two, stored as float32 or as biased exponents (e8m0/u8)."""
    if s.dtype == np.uint8:
        if scale_fmt != "ue8m0":
            raise CheckpointError(f"{where}: uint8 scales need quantization_config.scale_fmt='ue8m0'")
        return np.ldexp(np.float32(1), s.astype(np.int32) - 127)
    s = s.astype(np.float32)
    if scale_fmt == "ue8m0" and not np.all(np.frexp(s)[0] == 0.5):
        raise CheckpointError(f"{where}: scale_fmt is ue8m0 but the scales are not powers of two")
    return s


class HFTensors:
    """The tensors of a HF directory by key (``names``, ``shape``, ``location``, ``read``), from their safetensors
    headers (every shard's header is validated up front). ``read`` returns one tensor in HF layout, in its stored
    dtype (bf16 stays bf16: the caller casts once, into its own buffer); fp8 weights come dequantised to float32
    with their ``weight_scale_inv`` blocks (``quantization_config``: ``weight_block_size``,
    ``scale_fmt``), whose shapes are checked here, before anything is read."""

    def __init__(self, directory: str, quantization: dict | None = None):
        quantization = quantization or {}
        self.block = tuple(quantization.get("weight_block_size") or (128, 128))
        self.scale_fmt = quantization.get("scale_fmt")
        self._files: dict[str, SafetensorsFile] = {}
        for fname, names in iter_checkpoint_files(directory):
            f = SafetensorsFile(fname)
            held = set(f.names())
            missing = [n for n in names if n not in held]
            if missing:
                raise CheckpointError(f"{fname}: index lists tensor {missing[0]!r} that the file does not hold")
            self._files |= dict.fromkeys(names, f)
        for key, f in self._files.items():
            scale = self._files.get(key + "_scale_inv")
            if f.dtype(key) in FP8 and scale is None:
                raise CheckpointError(f"{f.path}: fp8 tensor {key!r} has no {key + '_scale_inv'!r}")
            if scale is not None:
                want = fp8_scale_shape(f.shape(key), self.block) if len(f.shape(key)) == 2 else None
                got = scale.shape(key + "_scale_inv")
                if got != want:
                    raise CheckpointError(
                        f"{scale.path}: {key + '_scale_inv'!r} has shape {got}, expected {want} for weight "
                        f"{f.shape(key)} in {self.block[0]}x{self.block[1]} blocks"
                    )

    def names(self) -> list[str]:
        return list(self._files)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._files[key].shape(key)

    def location(self, key: str) -> str:
        return self._files[key].path

    def read(self, key: str) -> np.ndarray:
        f = self._files[key]
        scale = self._files.get(key + "_scale_inv")
        if scale is None:
            return f.read(key)
        s = _decode_scales(scale.read(key + "_scale_inv"), self.scale_fmt, scale.path)
        return dequant_fp8(f.read(key), s, self.block)


def hf_shape(entry: Entry, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF layout of a parameter slice of ``shape`` (``[out, in]`` for linears; biases flat)."""
    if entry.transform == COPY:
        return (math.prod(shape),) if entry.key.endswith(".bias") else tuple(shape)
    n_in = 2 if entry.transform == LINEAR2 else 1
    return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))


def check_tensors(tensors, cfg: ModelConfig, *, mtp: bool, source: str) -> dict[str, Entry]:
    """Match a tensor store's keys against the table for ``cfg``, checking every shape once: an unknown key, a
    wrong shape or a missing tensor is a ``CheckpointError`` naming the file. Returns the table by key."""
    specs = param_specs(cfg, mtp=mtp)
    table = {e.key: e for e in entries(cfg, mtp=mtp)}
    mtp_ids = "|".join(map(str, _mtp_ids(cfg)))
    for key in tensors.names():
        entry = table.get(key)
        if entry is None:
            if IGNORED.match(key) or (mtp_ids and re.match(rf"model\.layers\.({mtp_ids})\.", key)):
                continue
            raise CheckpointError(
                f"{tensors.location(key)}: tensor {key!r} does not match the config (weights/config mismatch)"
            )
        want = hf_shape(entry, _spec_at(specs, entry.path).shape[len(entry.index) :])
        if tuple(tensors.shape(key)) != want:
            raise CheckpointError(
                f"{tensors.location(key)}: tensor {key!r} has shape {tuple(tensors.shape(key))}, expected {want} "
                "(weights/config mismatch)"
            )
    held = set(tensors.names())
    missing = [k for k in table if k not in held and not k.endswith(OPTIONAL)]
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} tensors missing from the checkpoint, e.g. {missing[0]!r}")
    return table


def to_param(a: np.ndarray, transform: str, shape: tuple[int, ...]) -> np.ndarray:
    """HF tensor -> parameter slice of ``shape``."""
    if transform != COPY:
        a = a.T
    if a.size != math.prod(shape):
        raise ValueError(f"has shape {a.shape}, expected {shape}")
    return a.reshape(shape)


def from_param(a: np.ndarray, transform: str, flat: bool = False) -> np.ndarray:
    """Parameter slice -> HF tensor (inverse of ``to_param``); ``flat`` for HF vectors stored per head here."""
    if transform == COPY:
        return a.reshape(-1) if flat else a
    n_in = 2 if transform == LINEAR2 else 1
    return a.reshape(math.prod(a.shape[:n_in]), -1).T


def _mtp_ids(cfg: ModelConfig) -> list[int]:
    return [cfg.n_layers + k for k in range(cfg.n_mtp_layers)]


# --- export -----------------------------------------------------------------------------------------------------------
def _export_dtype(entry: Entry, dtype) -> np.dtype:
    return np.dtype(np.float32) if "router" in entry.path[-1] else np.dtype(dtype)


def hf_layout(cfg: ModelConfig, *, mtp: bool, dtype) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """``(HF key, dtype, shape)`` of every tensor an export writes, in writing order (routers stay float32)."""
    specs = param_specs(cfg, mtp=mtp)
    return [
        (e.key, _export_dtype(e, dtype), hf_shape(e, _spec_at(specs, e.path).shape[len(e.index) :]))
        for e in entries(cfg, mtp=mtp)
    ]


def hf_pieces(read: ParamReader, cfg: ModelConfig, *, mtp: bool, dtype) -> Iterator[np.ndarray]:
    """The tensors of ``hf_layout``, one at a time, each read as the parameter slice it comes from."""
    for e in entries(cfg, mtp=mtp):
        a = read(e.path, e.index)
        yield np.ascontiguousarray(from_param(a, e.transform, flat=e.key.endswith(".bias")), _export_dtype(e, dtype))


def hf_config(cfg: ModelConfig, base: dict | None = None) -> dict:
    """A ``config.json`` for ``cfg``: the source's own config when known, else one written from the fields."""
    if base:
        return dict(base)
    out = {
        "model_type": cfg.arch.value,
        "architectures": [
            {
                "deepseek_v3": "DeepseekV3ForCausalLM",
                "deepseek_v2": "DeepseekV2ForCausalLM",
                "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM",
                "llama": "LlamaForCausalLM",
            }[cfg.arch.value]
        ],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffw,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) != 1 else cfg.eos_token_ids[0],
        "pad_token_id": cfg.pad_token_id,
        "attention_bias": cfg.o_bias or (cfg.qkv_bias and cfg.arch.value == "llama"),
        "mlp_bias": cfg.mlp_bias,
        "head_dim": cfg.head_size if not cfg.is_mla else cfg.qk_rope_dim,
    }
    r = cfg.rope
    rope = {"rope_type": r.type.value, "rope_theta": r.theta}
    if r.type.value != "default":
        rope |= {"factor": r.factor, "original_max_position_embeddings": r.original_max_position}
    if r.type.value == "llama3":
        rope |= {"low_freq_factor": r.low_freq_factor, "high_freq_factor": r.high_freq_factor}
    if r.type.value == "yarn":
        rope |= {
            "beta_fast": r.beta_fast,
            "beta_slow": r.beta_slow,
            "mscale": r.mscale,
            "mscale_all_dim": r.mscale_all_dim,
        }
    out["rope_parameters"] = rope
    out["rope_theta"] = r.theta
    if cfg.is_mla:
        out |= _mla_moe_config(cfg)
    return out


def _mla_moe_config(cfg: ModelConfig) -> dict:
    """The DeepSeek-V2/V3 fields of ``config.json`` (what ``config_from_hf`` reads back)."""
    return {
        "q_lora_rank": cfg.q_lora_rank,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_dim,
        "qk_rope_head_dim": cfg.qk_rope_dim,
        "v_head_dim": cfg.v_head_dim,
        "n_routed_experts": cfg.n_experts or None,
        "n_shared_experts": cfg.n_shared_experts or None,
        "num_experts_per_tok": cfg.experts_per_token or None,
        "moe_intermediate_size": cfg.moe_ffw,
        "first_k_dense_replace": cfg.first_k_dense,
        "n_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "scoring_func": cfg.scoring.value,
        "topk_method": cfg.topk_method.value,
        "norm_topk_prob": cfg.norm_topk_prob,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "num_nextn_predict_layers": cfg.n_mtp_layers,
        "rope_interleave": cfg.rope_interleave,
    }


def write_hf(
    read: ParamReader,
    cfg: ModelConfig,
    out_dir: str,
    *,
    mtp: bool = False,
    base_config: dict | None = None,
    files: dict[str, str] | None = None,
    dtype=np.float32,
    shard_bytes: int = 2 << 30,
    progress: str | None = None,
) -> None:
    """Write a HF directory (config.json + safetensors shards + index) one tensor at a time, atomically (temporary
    directory, renamed when complete). ``read(path, index)`` returns the parameter slice ``params[path][index]``;
    ``files`` maps further file names (tokenizer files) to their text."""
    tmp = partial_dir(out_dir)
    try:
        layout = hf_layout(cfg, mtp=mtp, dtype=dtype)
        pieces = hf_pieces(read, cfg, mtp=mtp, dtype=dtype)
        write_sharded(tmp, layout, pieces, shard_bytes=shard_bytes, metadata={"format": "pt"}, progress=progress)
        config = hf_config(cfg, base_config)
        config["torch_dtype"] = config["dtype"] = dtype_name(dtype)
        Path(os.path.join(tmp, "config.json")).write_text(json.dumps(config, indent=2))
        for name, text in sorted((files or {}).items()):
            Path(tmp, name).write_text(text)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def dtype_name(dtype) -> str:
    return "bfloat16" if np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16) else np.dtype(dtype).name


def partial_dir(out_dir: str) -> str:
    """A fresh, empty ``.r1jax-partial-<name>`` beside ``out_dir``, where a write goes until it is complete: a fixed
    name, so a rerun after a kill starts over in the same place and removes what the killed run left."""
    parent, name = os.path.split(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        raise CheckpointError(f"{out_dir}: parent directory does not exist")
    if not os.access(parent, os.W_OK):
        raise CheckpointError(f"{out_dir}: parent directory is not writable")
    tmp = os.path.join(parent, f".r1jax-partial-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp)
    return tmp


def _replace_dir(tmp: str, out_dir: str) -> None:
    if os.path.exists(out_dir):
        old = out_dir.rstrip("/") + ".old-r1jax"
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)


# --- PEFT adapters ----------------------------------------------------------------------------------------------------
# (PEFT key, "a" or "b", the base weight's table entry, HF shape)
PeftTensor: TypeAlias = tuple[str, str, Entry, tuple[int, ...]]
_LAYER_PREFIX = re.compile(r"^model\.layers\.\d+\.")


def _adapter_paths(tree: dict, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dict]]:
    """The ``{"a", "b"}`` leaves of a ``lora.adapters`` tree, by parameter path."""
    for k, v in tree.items():
        if isinstance(v, dict) and set(v) == {"a", "b"}:
            yield (*prefix, k), v
        elif isinstance(v, dict):
            yield from _adapter_paths(v, (*prefix, k))


def _linear_rows(cfg: ModelConfig, mtp: bool) -> dict[tuple[str, ...], list[Entry]]:
    """The table's linear weights by parameter path (a routed expert's path has one row per layer and expert)."""
    rows: dict[tuple[str, ...], list[Entry]] = {}
    for e in entries(cfg, mtp=mtp):
        if e.transform != COPY and e.key.endswith(".weight"):
            rows.setdefault(e.path, []).append(e)
    return rows


def peft_layout(adapters: dict, cfg: ModelConfig, *, rank: int) -> list[PeftTensor]:
    """Every tensor of the PEFT LoRA adapter for ``adapters``, from the base table: ``a`` [*in, r] is a weight with
    r outputs and ``b`` [r, *out] one with r inputs, so each takes the HF layout of its base weight's row
    (``lora_A`` [r, in], ``lora_B`` [out, r]); routed experts give one pair per expert. Raises CheckpointError for
    an adapter no HF linear weight maps to, or one whose shapes do not fit the model and ``rank``."""
    found = dict(_adapter_paths(adapters))
    mtp = any(p[0] == "mtp" for p in found)
    specs, rows = param_specs(cfg, mtp=mtp), _linear_rows(cfg, mtp)
    out = []
    for path, ab in found.items():
        name = "/".join(path)
        if path not in rows:
            raise CheckpointError(f"LoRA adapter {name}: no HF linear weight maps to this parameter")
        e0 = rows[path][0]
        shape, lead, n_in = _spec_at(specs, path).shape, len(e0.index), 2 if e0.transform == LINEAR2 else 1
        want = {"a": (*shape[: lead + n_in], rank), "b": (*shape[:lead], rank, *shape[lead + n_in :])}
        for part in ("a", "b"):
            if tuple(ab[part].shape) != want[part]:
                raise CheckpointError(
                    f"LoRA adapter {name}: {part} has shape {tuple(ab[part].shape)}, expected {want[part]} for "
                    f"rank {rank}"
                )
        for part, lora, transform in (("a", "lora_A", e0.transform), ("b", "lora_B", LINEAR)):
            for e in rows[path]:
                key = f"base_model.model.{e.key.removesuffix('.weight')}.{lora}.weight"
                out.append((key, part, e, hf_shape(dataclasses.replace(e, transform=transform), want[part][lead:])))
    return out


def peft_targets(layout: list[PeftTensor], cfg: ModelConfig) -> tuple[list[str], list[str]]:
    """``(target_modules, target_parameters)`` naming exactly the modules ``layout`` writes. Without routed experts:
    the modules' own names (``q_proj``). With them, transformers 5 fuses the per-expert modules into stacked
    parameters and PEFT, loading, turns every target named like an expert projection (``gate_proj``) into those
    parameters; so routed experts are named by module suffix (``mlp.experts.3.gate_proj``, which PEFT converts) and
    the other projections sharing their names by weight (``mlp.gate_proj.weight``, which it leaves alone)."""
    rows = _linear_rows(cfg, mtp=False)
    expert_names = {e.key.split(".")[-2] for es in rows.values() for e in es if len(e.index) == 2}
    modules, parameters = set(), set()
    for _, _, e, _ in layout:
        module = e.key.removesuffix(".weight")
        leaf, suffix = module.rsplit(".", 1)[-1], _LAYER_PREFIX.sub("", module)
        if leaf not in expert_names:
            modules.add(leaf)
        elif len(e.index) == 2:
            modules.add(suffix)
        else:
            parameters.add(suffix + ".weight")
    return sorted(modules), sorted(parameters)


def write_peft_adapter(
    adapters: dict, cfg: ModelConfig, out_dir: str, *, rank: int, alpha: float, base_model_name_or_path: str = ""
) -> None:
    """Write ``adapters`` (a ``lora.adapters`` tree, host or device arrays) as a PEFT LoRA adapter directory
    (``adapter_config.json`` + ``adapter_model.safetensors``, each tensor in its adapter's dtype) that
    ``peft.PeftModel.from_pretrained`` loads onto the transformers model of ``cfg``: atomically, one adapter array
    on the host at a time."""
    layout = peft_layout(adapters, cfg, rank=rank)
    found = dict(_adapter_paths(adapters))
    modules, parameters = peft_targets(layout, cfg)
    tmp = partial_dir(out_dir)
    try:
        file_layout = [(key, np.dtype(found[e.path][part].dtype), shape) for key, part, e, shape in layout]
        held: tuple = (None, None)  # ((path, part), that adapter array on the host)
        with StreamWriter(os.path.join(tmp, "adapter_model.safetensors"), file_layout, {"format": "pt"}) as w:
            for _, part, e, _ in layout:
                if held[0] != (e.path, part):
                    held = ((e.path, part), np.asarray(found[e.path][part]))
                transform = e.transform if part == "a" else LINEAR
                w.write(np.ascontiguousarray(from_param(held[1][e.index], transform)))
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": rank,
            "lora_alpha": alpha,
            "lora_dropout": 0.0,
            "bias": "none",
            "target_modules": modules,
            **({"target_parameters": parameters} if parameters else {}),
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "inference_mode": True,
            "base_model_name_or_path": base_model_name_or_path,
        }
        Path(tmp, "adapter_config.json").write_text(json.dumps(config, indent=2))
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
