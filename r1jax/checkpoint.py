"""Loading and saving models: HF directories, GGUF files and r1jax checkpoints (orbax).

An r1jax checkpoint directory holds ``r1jax.json`` (the ModelConfig and the source's HF config), the tokenizer files,
and ``params/`` (an orbax checkpoint of the parameter tree). Every write goes to a temporary directory that is renamed
into place when complete, so an interrupted convert or export leaves nothing half-written.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from r1jax import gguf, hf
from r1jax.config import ModelConfig, RopeConfig
from r1jax.errors import CheckpointError
from r1jax.model import Transformer, param_specs

META = "r1jax.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def config_to_dict(cfg: ModelConfig) -> dict:
    def enc(v):
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, RopeConfig):
            return {f.name: enc(getattr(v, f.name)) for f in dataclasses.fields(v)}
        return list(v) if isinstance(v, tuple) else v

    return {f.name: enc(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def config_from_dict(d: dict) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(d) - known
    if unknown:
        raise CheckpointError(f"unknown model config fields {sorted(unknown)}")
    return ModelConfig(**d)


def _tokenizer_files(directory: str) -> dict[str, str]:
    return {n: (Path(directory) / n).read_text() for n in TOKENIZER_FILES if (Path(directory) / n).exists()}


def _read_source(path: str, mtp: bool):
    """(ModelConfig, HF config dict, tensor iterator, tokenizer files) for a HF directory or a GGUF file."""
    if path.endswith(".gguf"):
        reader = gguf._reader(path)
        hf_cfg = gguf.hf_config(path, reader)
        return hf.config_from_hf(hf_cfg), hf_cfg, gguf.iter_tensors(path, reader), gguf.tokenizer_files(path, reader)
    hf_cfg = hf.read_config(path)
    cfg = hf.config_from_hf(hf_cfg)
    files = {
        n: Path(os.path.join(path, n)).read_text() for n in TOKENIZER_FILES if os.path.exists(os.path.join(path, n))
    }
    if mtp and cfg.n_mtp_layers == 0:
        raise CheckpointError(f"{path}: the config has no multi-token-prediction layers")
    return cfg, hf_cfg, hf.iter_tensors(path), files


def load(
    path: str,
    *,
    dtype: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    mtp: bool = False,
    attention_impl: str | None = None,
) -> Transformer:
    """Load a HF directory (config.json + safetensors), a ``.gguf`` file or an r1jax checkpoint/run directory.

    ``dtype`` sets both parameter and compute dtype (e.g. "bfloat16"); ``mesh`` places every parameter directly with
    its sharding from the logical-axis rules; ``mtp`` also loads the multi-token-prediction module.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        return _load_r1jax(path, dtype=dtype, mesh=mesh, attention_impl=attention_impl)
    if os.path.isfile(path) and not path.endswith(".gguf"):
        raise CheckpointError(
            f"{path}: expected a checkpoint directory or a .gguf file"
            + ("; r1jax never unpickles" if path.endswith((".bin", ".pt", ".pth", ".pkl")) else "")
        )
    cfg, hf_cfg, tensors, files = _read_source(path, mtp)
    cfg = _with_numerics(cfg, dtype, attention_impl)
    params = hf.assemble(tensors, cfg, mtp=mtp, dtype=np.float32, source=path)
    return _make_model(cfg, params, mesh, hf_cfg, files)


def _with_numerics(cfg: ModelConfig, dtype: str | None, attention_impl: str | None) -> ModelConfig:
    if dtype:
        cfg = cfg.replace(dtype=str(jnp.dtype(dtype)), param_dtype=str(jnp.dtype(dtype)))
    if attention_impl:
        cfg = cfg.replace(attention_impl=attention_impl)
    return cfg


def _place(params: dict, cfg: ModelConfig, mesh) -> dict:
    """Cast to the declared dtypes and put each leaf on device(s) — sharded by the rules table when ``mesh`` (each
    device receives only its slice). Host arrays are released leaf by leaf, so host memory peaks at one copy of the
    model plus one tensor."""
    from r1jax.sharding import param_shardings

    specs = param_specs(cfg, mtp="mtp" in params)
    shardings = param_shardings(specs, mesh) if mesh is not None else None
    out: dict = {}
    for path, spec in jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: hasattr(x, "axes")):
        keys = [k.key for k in path]
        host_parent, out_parent = params, out
        for k in keys[:-1]:
            host_parent, out_parent = host_parent[k], out_parent.setdefault(k, {})
        a = np.asarray(host_parent[keys[-1]]).astype(jnp.dtype(spec.dtype or cfg.param_dtype), copy=False)
        if shardings is None:
            out_parent[keys[-1]] = jnp.array(a)
        else:
            sh = shardings
            for k in keys:
                sh = sh[k]
            out_parent[keys[-1]] = jax.make_array_from_callback(a.shape, sh, lambda idx, a=a: a[idx])
        host_parent[keys[-1]] = None  # release the host copy now
    return out


def _make_model(cfg, params, mesh, hf_cfg, files) -> Transformer:
    model = Transformer(cfg, _place(params, cfg, mesh))
    model.hf_config = json.dumps(hf_cfg)
    model.tokenizer_files = tuple(sorted(files.items()))
    return model


def _params_candidates(path: str) -> list[str]:
    """Parameter directories to try, newest first: ``params/`` of an r1jax checkpoint, or the finalised steps of a
    training run (``checkpoints/<step>/params``; orbax renames a step into place only once it is complete)."""
    if os.path.isdir(os.path.join(path, "params")):
        return [os.path.join(path, "params")]
    root = os.path.join(path, "checkpoints")
    steps = sorted((int(d) for d in os.listdir(root) if d.isdigit()), reverse=True) if os.path.isdir(root) else []
    return [os.path.join(root, str(s), "params") for s in steps if os.path.isdir(os.path.join(root, str(s), "params"))]


def _load_r1jax(path: str, *, dtype, mesh, attention_impl) -> Transformer:
    import orbax.checkpoint as ocp

    candidates = _params_candidates(path)
    if not os.path.exists(os.path.join(path, META)) or not candidates:
        raise CheckpointError(
            f"{path}: not a checkpoint (no config.json, or {META} with params/ or checkpoints/) "
            "— pass a HF directory, a .gguf file, an r1jax checkpoint or a training run"
        )
    meta = json.loads(Path(os.path.join(path, META)).read_text())
    saved_cfg = config_from_dict(meta["config"])
    cfg = _with_numerics(saved_cfg, dtype, attention_impl)
    specs = param_specs(saved_cfg, mtp=meta.get("mtp", False))
    target = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(s.dtype or saved_cfg.param_dtype)),
        specs,
        is_leaf=lambda x: hasattr(x, "axes"),
    )
    errors = []
    for params_dir in candidates:
        try:
            with ocp.StandardCheckpointer() as ckptr:
                params = ckptr.restore(os.path.abspath(params_dir), target)
            break
        except Exception as e:  # orbax raises many types for damaged checkpoints: fall back to an older step
            errors.append(f"{params_dir}: {e.__class__.__name__}")
            warnings.warn(f"cannot restore {params_dir} ({e.__class__.__name__}); trying an older one", stacklevel=2)
    else:
        raise CheckpointError(f"{path}: no restorable parameters ({'; '.join(errors)[:300]})")
    return _make_model(cfg, jax.tree.map(np.asarray, params), mesh, meta.get("hf_config") or {}, _tokenizer_files(path))


def save(model: Transformer, out_dir: str) -> None:
    """Write an r1jax checkpoint directory atomically."""
    import orbax.checkpoint as ocp

    tmp = _tmp_sibling(out_dir)
    try:
        params = model.param_dict()
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, "params"), params)
            ckptr.wait_until_finished()
        meta = {
            "config": config_to_dict(model.cfg),
            "hf_config": json.loads(getattr(model, "hf_config", "{}")),
            "mtp": "mtp" in params,
            "format": 1,
        }
        _write_tokenizer(model, tmp)
        Path(os.path.join(tmp, META)).write_text(json.dumps(meta, indent=2))
        hf._replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_tokenizer(model: Transformer, directory: str) -> None:
    for name, text in getattr(model, "tokenizer_files", ()):
        with open(os.path.join(directory, name), "w") as f:
            f.write(text)


def _tmp_sibling(out_dir: str) -> str:
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    if not os.path.isdir(parent):
        raise CheckpointError(f"{out_dir}: parent directory does not exist")
    if not os.access(parent, os.W_OK):
        raise CheckpointError(f"{out_dir}: parent directory is not writable")
    return tempfile.mkdtemp(prefix=".r1jax-tmp-", dir=parent)


def convert(src: str, out_dir: str, *, dtype: str | None = None, mtp: bool = False) -> Transformer:
    """HF directory or GGUF file -> r1jax checkpoint."""
    model = load(src, dtype=dtype, mtp=mtp)
    save(model, out_dir)
    return model


def export_hf(model: Transformer, out_dir: str, *, dtype: str | None = None, shard_bytes: int = 2 << 30) -> None:
    """Write a HF directory (config.json + safetensors + tokenizer files) that transformers loads."""
    import ml_dtypes

    dt = np.dtype(ml_dtypes.bfloat16) if (dtype or model.cfg.param_dtype) == "bfloat16" else np.dtype(np.float32)
    params = jax.tree.map(lambda a: np.asarray(jax.device_get(a), np.float32), model.param_dict())
    base = json.loads(getattr(model, "hf_config", "{}") or "{}")
    base.pop("quantization_config", None)  # weights are written dequantised
    with tempfile.TemporaryDirectory() as tok_dir:
        _write_tokenizer(model, tok_dir)
        extra = {n: os.path.join(tok_dir, n) for n in os.listdir(tok_dir)}
        hf.write_hf(
            params, model.cfg, out_dir, base_config=base or None, extra_files=extra, dtype=dt, shard_bytes=shard_bytes
        )
