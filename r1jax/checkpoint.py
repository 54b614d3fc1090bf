"""Loading and saving models: HF directories, GGUF files, r1jax checkpoints and training runs.

An r1jax checkpoint directory holds ``r1jax.json`` (the ModelConfig and the source's HF config), the tokenizer files,
and the parameters: format 2 (what ``convert`` and ``save`` write) as safetensors shards keyed by parameter path
(``param_source``); format 1 (still read) and a run's steps as orbax checkpoints under ``params/`` and
``checkpoints/<step>/params``. Every write goes to a temporary directory that is renamed into place when complete, so
an interrupted convert, save or export leaves nothing half-written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from r1jax import hf, param_source
from r1jax.config import ModelConfig
from r1jax.errors import CheckpointError
from r1jax.model import Transformer, param_specs
from r1jax.sharding import check_rules, normalize_mesh, param_shardings


def load(
    path: str,
    *,
    dtype: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    mtp: bool = False,
    attention_impl: str | None = None,
    numerics: ModelConfig | Mapping[str, Any] | None = None,
    abstract: bool = False,
) -> Transformer:
    """Load a HF directory (config.json + safetensors), a ``.gguf`` file or an r1jax checkpoint/run directory.

    The architecture is the checkpoint's; the numerics (``config.NUMERICS``) are ``numerics`` (a run's model config,
    or a mapping of some of those fields), else ``dtype`` (parameter and compute dtype, e.g. "bfloat16") and
    ``attention_impl``. ``mesh`` (any ``jax.sharding.Mesh`` over r1jax's axis names) places every parameter with its
    sharding from the logical-axis rules. Each process reads only the slices of its own devices, one source tensor
    at a time, so its peak host memory is its shard plus one tensor. ``mtp`` also loads the multi-token-prediction
    module. ``abstract`` reads no parameters: the model holds each one's shape, dtype and sharding (what a resumed
    run restores its own checkpoint into).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    mesh = normalize_mesh(mesh) if mesh is not None else None
    numerics = _numerics(dtype, attention_impl, numerics)
    run_lora = lora_run(path)
    if run_lora is not None:
        return _load_lora_run(path, run_lora, mesh=mesh, numerics=numerics, abstract=abstract)
    src = param_source.open_source(path, mtp=mtp)
    cfg = src.cfg.with_numerics(numerics)
    specs = param_specs(cfg, mtp=src.mtp)
    _check_mesh(path, specs, mesh)
    shardings = _shardings(specs, mesh)
    if abstract:
        params = abstract_params(cfg, mesh, mtp=src.mtp)
    elif os.path.isdir(path) and param_source.params_candidates(path):  # orbax: format 1 and training runs
        params = _restore_orbax(path, specs, cfg, shardings)
    else:
        params = _read_sharded(src, specs, cfg, shardings)
    return Transformer(cfg, params, hf_config=src.hf_config, tokenizer_files=src.tokenizer_files)


def lora_run(path: str) -> dict | None:
    """A LoRA training run's adapter config (with its ``base`` checkpoint and ``seed``), or None for anything else."""
    meta = os.path.join(path, param_source.META)
    if not (os.path.isdir(path) and os.path.isfile(meta)):
        return None
    try:
        with open(meta) as f:
            return json.load(f).get("lora")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta}: unreadable ({e.__class__.__name__})") from None


def _lora_config(run_lora: dict):
    from r1jax.config import LoraConfig

    return LoraConfig(**{k: v for k, v in run_lora.items() if k not in ("base", "seed")})


def lora_run_adapters(path: str, run_lora: dict, *, mesh=None) -> dict:
    """The newest restorable adapters of a LoRA run (an ``r1jax.lora.adapters`` tree), restored into the shardings
    ``mesh`` gives them; the base is not read (their shapes come from the run's model config)."""

    from r1jax import lora

    cfg = param_source.open_source(path).cfg
    lcfg = _lora_config(run_lora)
    shapes = jax.eval_shape(lambda p: lora.attach(p, lcfg, cfg, jax.random.key(0)), abstract_params(cfg))
    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, shapes)
    else:
        shardings = lora.shardings(shapes, cfg, mesh)
    target = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                          lora.adapters(shapes), lora.adapters(shardings))  # fmt: skip
    return _restore_newest(path, target, "adapters")


def lora_run_params(path: str, run_lora: dict, *, mesh=None) -> tuple[Transformer, dict]:
    """(the base model, the adapted parameters) of a LoRA run: its base read again (its start point, with the run's
    numerics) with the newest checkpoint's adapters."""
    from r1jax import lora

    run_cfg = param_source.open_source(path).cfg
    if run_lora["base"]:
        base = load(run_lora["base"], mesh=mesh, numerics=run_cfg)
    else:
        base = Transformer.random(run_cfg, run_lora["seed"], mesh=mesh)
    if base.cfg != run_cfg:  # the base was replaced since: its adapters would not fit (or not mean the same)
        diff = [f.name for f in dataclasses.fields(run_cfg) if getattr(base.cfg, f.name) != getattr(run_cfg, f.name)]
        raise CheckpointError(
            f"{path}: its base {run_lora['base']} is not the model the adapters were trained on ({', '.join(diff[:3])} "
            "differ)"
        )
    params = lora.attach(base.param_dict(), _lora_config(run_lora), base.cfg, jax.random.key(0))
    return base, lora.with_adapters(params, lora_run_adapters(path, run_lora, mesh=mesh))


def export_adapter(path: str, out_dir: str) -> None:
    """A LoRA run's newest adapters as a PEFT adapter directory (``adapter_config.json`` +
    ``adapter_model.safetensors``) for the transformers model of its base."""
    run_lora = lora_run(path)
    if run_lora is None:
        raise CheckpointError(f"{path}: not a LoRA training run, so it has no adapter to export (drop --adapter)")
    adapters = jax.device_get(lora_run_adapters(path, run_lora))
    lcfg = _lora_config(run_lora)
    cfg = param_source.open_source(path).cfg
    hf.write_peft_adapter(adapters, cfg, out_dir, rank=lcfg.rank, alpha=lcfg.alpha,
                          base_model_name_or_path=run_lora["base"] or "")  # fmt: skip


def _load_lora_run(path: str, run_lora: dict, *, mesh, numerics, abstract: bool) -> Transformer:
    """A LoRA run as one model: base and newest adapters merged, in the run's parameter dtype."""
    from r1jax import lora

    src = param_source.open_source(path)
    cfg = src.cfg.with_numerics(numerics)
    if abstract:
        files = src.tokenizer_files
        return Transformer(cfg, abstract_params(cfg, mesh), hf_config=src.hf_config, tokenizer_files=files)
    base, params = lora_run_params(path, run_lora, mesh=mesh)
    specs = param_specs(cfg)

    def merge(p):  # each parameter back in its declared dtype (the frozen base was stored in the compute dtype)
        return jax.tree.map(lambda x, s: x.astype(s.dtype or cfg.param_dtype), lora.merge(p), specs, is_leaf=_is_spec)

    merged = jax.jit(merge)(params)
    return Transformer(cfg, merged, hf_config=base.hf_config, tokenizer_files=base.tokenizer_files)


def _numerics(dtype: str | None, attention_impl: str | None, numerics) -> dict[str, Any]:
    """``load``'s numerics arguments as one mapping of ``config.NUMERICS`` fields."""
    out: dict[str, Any] = {}
    if dtype:
        out |= {"dtype": str(jnp.dtype(dtype)), "param_dtype": str(jnp.dtype(dtype))}
    if attention_impl:
        out["attention_impl"] = attention_impl
    if numerics is not None:
        out |= numerics.numerics() if isinstance(numerics, ModelConfig) else dict(numerics)
    return out


def _check_mesh(path: str, specs: dict, mesh) -> None:
    """One line naming the checkpoint when its shapes do not fit the mesh under the rules table."""
    if mesh is None:
        return
    try:
        check_rules(specs, mesh)
    except ValueError as e:
        problems = str(e).splitlines()[1:]
        raise CheckpointError(
            f"{path}: its architecture does not fit the mesh {dict(mesh.shape)} "
            f"({len(problems)} problems, e.g. {problems[0].strip()})"
        ) from None


def _shardings(specs: dict, mesh) -> dict:
    """Where each parameter goes: its rules-table sharding on ``mesh``, else the default device."""
    if mesh is not None:
        return param_shardings(specs, mesh)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda _: one, specs, is_leaf=_is_spec)


def _is_spec(x) -> bool:
    return hasattr(x, "axes") and hasattr(x, "shape")


def _target(spec, cfg: ModelConfig, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(spec.shape, jnp.dtype(spec.dtype or cfg.param_dtype), sharding=sharding)


def abstract_params(cfg: ModelConfig, mesh=None, *, mtp: bool = False) -> dict:
    """The parameters of ``cfg`` as shapes, dtypes and shardings (the rules table's on ``mesh``, else the default
    device), nothing read or computed: what a resumed run restores its own checkpoint into."""
    specs = param_specs(cfg, mtp=mtp)
    return jax.tree.map(lambda s, sh: _target(s, cfg, sh), specs, _shardings(specs, mesh), is_leaf=_is_spec)


def _read_sharded(src: param_source.ParamSource, specs: dict, cfg: ModelConfig, shardings: dict) -> dict:
    """Every parameter read from ``src`` into its sharding: this process reads each distinct slice its devices hold
    once, in the declared dtype, and lets it go (its copies to the devices done) before the next parameter."""

    def one(path, spec, sh):
        keys, dt = tuple(k.key for k in path), jnp.dtype(spec.dtype or cfg.param_dtype)
        slices: dict = {}
        shards = []
        for device, index in sh.addressable_devices_indices_map(spec.shape).items():
            key = tuple((s.start, s.stop) for s in index)
            if key not in slices:
                slices[key] = src.read(keys, index, dt)
            shards.append(jax.device_put(slices[key], device))
        # wait for the copies: transfers are asynchronous, and host slices queued behind them would add up
        return jax.block_until_ready(jax.make_array_from_single_device_arrays(spec.shape, sh, shards))

    return jax.tree_util.tree_map_with_path(one, specs, shardings, is_leaf=_is_spec)


def _restore_orbax(path: str, specs: dict, cfg: ModelConfig, shardings: dict) -> dict:
    """The newest restorable orbax parameters of a format-1 checkpoint or a training run, each restored straight into
    its target sharding and dtype (every process reads only its devices' slices); a damaged newest step is skipped
    with a warning."""
    target = jax.tree.map(lambda s, sh: _target(s, cfg, sh), specs, shardings, is_leaf=_is_spec)
    return _restore_newest(path, target, "parameters")


def _restore_newest(path: str, target, what: str):
    """``target`` (abstract arrays with shardings) restored from the newest restorable ``params/`` of a checkpoint or
    run; a damaged newer one is skipped with a warning."""
    import orbax.checkpoint as ocp

    errors = []
    for params_dir in param_source.params_candidates(path):
        try:
            with ocp.StandardCheckpointer() as ckptr:
                return ckptr.restore(os.path.abspath(params_dir), target)
        except Exception as e:  # orbax raises many types for damaged checkpoints: fall back to an older step
            errors.append(f"{params_dir}: {e.__class__.__name__}")
            warnings.warn(f"cannot restore {params_dir} ({e.__class__.__name__}); trying an older one", stacklevel=2)
    raise CheckpointError(f"{path}: no restorable {what} ({'; '.join(errors)[:300]})")


def save(model: Transformer, out_dir: str, *, dtype: str | None = None) -> None:
    """Write ``model`` as a format-2 r1jax checkpoint (what ``convert`` writes), one HF-tensor-sized piece at a time
    (a sharded model's pieces gathered one by one), atomically; ``dtype`` (default: the parameters') is stored."""
    param_source.write_checkpoint(param_source.from_model(model), out_dir, dtype=dtype, progress=False)


def convert(src: str, out_dir: str, *, dtype: str | None = None, mtp: bool = False) -> ModelConfig:
    """HF directory, GGUF file or r1jax checkpoint -> format-2 r1jax checkpoint, streamed one tensor at a time
    (``param_source.write_checkpoint``); returns the saved model config."""
    return param_source.write_checkpoint(param_source.open_source(src, mtp=mtp), out_dir, dtype=dtype)


def export_hf(
    model: Transformer | param_source.ParamSource,
    out_dir: str,
    *,
    dtype: str | None = None,
    shard_bytes: int = 2 << 30,
    progress: bool = False,
) -> None:
    """Write a HF directory (config.json + safetensors shards + tokenizer files) that transformers loads, one tensor
    at a time, from a ``ParamSource`` or a model (its possibly sharded arrays gathered one HF tensor at a time). On
    several processes all take part in the gathers and process 0 writes."""
    import ml_dtypes

    src = model if isinstance(model, param_source.ParamSource) else param_source.from_model(model)
    dt = np.dtype(ml_dtypes.bfloat16) if (dtype or src.cfg.param_dtype) == "bfloat16" else np.dtype(np.float32)
    if jax.process_index() != 0:
        for _ in hf.hf_pieces(src.read, src.cfg, mtp=src.mtp, dtype=dt):
            pass
        return
    base = dict(src.hf_config)
    base.pop("quantization_config", None)  # weights are written dequantised
    hf.write_hf(
        src.read,
        src.cfg,
        out_dir,
        mtp=src.mtp,
        base_config=base or None,
        files=src.tokenizer_files,
        dtype=dt,
        shard_bytes=shard_bytes,
        progress="export" if progress else None,
    )
