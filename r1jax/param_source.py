"""Read any slice of any r1jax parameter from a checkpoint, touching only the source tensors that slice needs.

``open_source(path)`` opens a HF directory (safetensors, bf16/f32 or DeepSeek fp8 blocks), a ``.gguf`` file, or an
r1jax checkpoint (format 2: safetensors shards keyed by parameter path; format 1 and training runs: orbax) and
validates every name and shape up front. ``ParamSource.read(path, index)`` then returns
``params[path][index]`` as a numpy array, assembled from one source tensor at a time: for a HF checkpoint each HF
tensor fills ``params[path][l, j]`` (layer ``l``, expert ``j``) as the declarative key table in ``hf.py`` says, so a
slice over some layers or experts reads only theirs. Nothing stays memory-mapped: a process holds what it keeps.

The r1jax checkpoint format 2 (``r1jax.json`` with ``"format": 2``): ``model-*.safetensors`` + the HF-style
``model.safetensors.index.json``; one tensor per parameter, stacked parameters (leading ``layers`` axis) one tensor
per layer, named ``stack/<layer>/rest/of/path`` (``stored_name``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import numpy as np

from r1jax import gguf, hf
from r1jax.config import ModelConfig, to_json
from r1jax.errors import CheckpointError
from r1jax.model import ParamSpec, param_specs
from r1jax.safetensors_io import SafetensorsFile, iter_checkpoint_files, write_sharded

META = "r1jax.json"
FORMAT = 2
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")

# How one parameter is stored: ``depth`` leading axes address its pieces; ``load(lead, rest)`` returns
# ``param[lead][rest]`` (``rest``: concrete slices over the remaining axes), or None for an absent optional tensor.
Load = Callable[[tuple[int, ...], tuple[slice, ...]], "np.ndarray | None"]


@dataclasses.dataclass(frozen=True)
class Pieces:
    depth: int
    load: Load


def checkpoint_meta(cfg: ModelConfig, hf_config: dict | None, *, mtp: bool, fmt: int, **extra) -> dict:
    """The ``r1jax.json`` of a checkpoint (``fmt`` = ``FORMAT``) or of a run directory (1): the model config, the
    HF config it came from, whether the MTP module is stored, and ``extra`` (a LoRA run's adapter config)."""
    return {"format": fmt, "config": to_json(cfg), "hf_config": hf_config, "mtp": mtp, **extra}


def config_from_dict(d: dict) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(d) - known
    if unknown:
        raise CheckpointError(f"unknown model config fields {sorted(unknown)}")
    return ModelConfig(**d)


def leaves(specs: dict) -> Iterator[tuple[tuple[str, ...], ParamSpec]]:
    """``(path, spec)`` of every parameter, in the tree's order."""
    for path, spec in jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, ParamSpec)):
        yield tuple(k.key for k in path), spec


def is_stacked(spec: ParamSpec) -> bool:
    return bool(spec.axes) and spec.axes[0] == "layers"


def stored_name(path: tuple[str, ...], layer: int | None = None) -> str:
    """The format-2 tensor name of a parameter, or of one layer of a stacked one."""
    return "/".join(path if layer is None else (path[0], str(layer), *path[1:]))


def stored_layout(specs: dict, cfg: ModelConfig, dtype) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """``(name, dtype, shape)`` of every format-2 tensor, in writing order (declared dtypes such as the float32
    router are kept)."""
    out = []
    for path, spec in leaves(specs):
        dt = np.dtype(spec.dtype) if spec.dtype else np.dtype(dtype)
        if is_stacked(spec):
            out += [(stored_name(path, layer), dt, spec.shape[1:]) for layer in range(spec.shape[0])]
        else:
            out.append((stored_name(path), dt, spec.shape))
    return out


@dataclasses.dataclass(frozen=True)
class ParamSource:
    """A checkpoint opened for reading parameter slices (see the module docstring). ``dtype`` is what ``read``
    returns by default for parameters without a declared dtype: float32 for HF and GGUF sources (fp8 and quantised
    weights dequantised), the stored dtype for r1jax checkpoints."""

    cfg: ModelConfig
    hf_config: dict
    tokenizer_files: dict[str, str]
    mtp: bool
    specs: dict
    location: str
    dtype: np.dtype
    pieces: Callable[[tuple[str, ...]], Pieces] = dataclasses.field(repr=False)

    def spec(self, path: tuple[str, ...]) -> ParamSpec:
        node = self.specs
        for p in path:
            if not isinstance(node, dict) or p not in node:
                raise KeyError(f"no parameter {'/'.join(path)!r}")
            node = node[p]
        if not isinstance(node, ParamSpec):
            raise KeyError(f"{'/'.join(path)!r} is not a parameter")
        return node

    def paths(self) -> list[tuple[str, ...]]:
        return [p for p, _ in leaves(self.specs)]

    def read(self, path: tuple[str, ...], index: tuple = (), dtype=None) -> np.ndarray:
        """``params[path][index]`` (``index``: ints and step-1 slices, as numpy indexes), read piece by piece."""
        spec = self.spec(path)
        box, drop = _normalize(index, spec.shape, path)
        out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(spec.dtype) if spec.dtype else self.dtype
        out = np.empty(tuple(s.stop - s.start for s in box), out_dtype)
        pieces = self.pieces(path)
        d = pieces.depth
        for lead in itertools.product(*(range(s.start, s.stop) for s in box[:d])):
            piece = pieces.load(lead, box[d:])
            at = tuple(i - s.start for i, s in zip(lead, box, strict=False))
            out[at] = (0.0 if spec.init == "zeros" else 1.0) if piece is None else piece
        return out.reshape(tuple(n for i, n in enumerate(out.shape) if i not in drop))


def _normalize(index, shape: tuple[int, ...], path) -> tuple[tuple[slice, ...], set[int]]:
    """Concrete ``slice(start, stop)`` per axis, and the axes an int index drops."""
    index = index if isinstance(index, tuple) else (index,)
    if len(index) > len(shape):
        raise IndexError(f"{'/'.join(path)}: index {index} has more axes than shape {shape}")
    box, drop = [], set()
    for axis, n in enumerate(shape):
        ix = index[axis] if axis < len(index) else slice(None)
        if isinstance(ix, slice):
            start, stop, step = ix.indices(n)
            if step != 1:
                raise IndexError(f"{'/'.join(path)}: only step-1 slices are read (got {ix})")
            box.append(slice(start, max(start, stop)))
        else:
            i = int(ix) + (n if int(ix) < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"{'/'.join(path)}: index {ix} out of range for axis {axis} of {shape}")
            box.append(slice(i, i + 1))
            drop.add(axis)
    return tuple(box), drop


# --- sources ----------------------------------------------------------------------------------------------------------
def open_source(path: str, *, mtp: bool = False) -> ParamSource:
    """Open a HF directory, a ``.gguf`` file or an r1jax checkpoint / training run for slice reads."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise CheckpointError(
                f"{path}: expected a checkpoint directory or a .gguf file"
                + ("; r1jax never unpickles" if path.endswith((".bin", ".pt", ".pth", ".pkl")) else "")
            )
        reader = gguf._reader(path)
        hf_cfg = gguf.hf_config(path, reader)
        return _table_source(path, hf_cfg, gguf.GGUFTensors(path, reader), gguf.tokenizer_files(path, reader), mtp)
    if os.path.exists(os.path.join(path, "config.json")):
        hf_cfg = hf.read_config(path)
        tensors = hf.HFTensors(path, hf_cfg.get("quantization_config"))
        return _table_source(path, hf_cfg, tensors, _tokenizer_files(path), mtp)
    return _r1jax_source(path, mtp)


def _tokenizer_files(directory: str) -> dict[str, str]:
    return {n: (Path(directory) / n).read_text() for n in TOKENIZER_FILES if (Path(directory) / n).exists()}


def _table_source(location: str, hf_cfg: dict, tensors, files: dict[str, str], mtp: bool) -> ParamSource:
    """A HF-named tensor store (``hf.HFTensors``, ``gguf.GGUFTensors``) read through the key table."""
    cfg = hf.config_from_hf(hf_cfg)
    if mtp and cfg.n_mtp_layers == 0:
        raise CheckpointError(f"{location}: the config has no multi-token-prediction layers")
    specs = param_specs(cfg, mtp=mtp)
    table = hf.check_tensors(tensors, cfg, mtp=mtp, source=location)
    by_path: dict[tuple[str, ...], dict[tuple[int, ...], hf.Entry]] = {}
    for e in table.values():
        by_path.setdefault(e.path, {})[e.index] = e
    held = set(tensors.names())

    def pieces(path: tuple[str, ...]) -> Pieces:
        rows = by_path[path]
        depth = len(next(iter(rows)))
        shape = source.spec(path).shape[depth:]

        def load(lead, rest):
            e = rows[lead]
            if e.key not in held:  # an optional tensor (e.g. V2's absent correction bias)
                return None
            return hf.to_param(tensors.read(e.key), e.transform, shape)[rest]

        return Pieces(depth, load)

    source = ParamSource(cfg, hf_cfg, files, mtp, specs, location, np.dtype(np.float32), pieces)
    return source


def _read_meta(path: str) -> dict:
    meta_path = os.path.join(path, META)
    if not os.path.exists(meta_path):
        raise CheckpointError(
            f"{path}: not a checkpoint (no config.json, or {META} with params/ or checkpoints/) "
            "— pass a HF directory, a .gguf file, an r1jax checkpoint or a training run"
        )
    try:
        return json.loads(Path(meta_path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path}: invalid JSON ({e})") from None


def _r1jax_source(path: str, mtp: bool) -> ParamSource:
    meta = _read_meta(path)
    cfg = config_from_dict(meta["config"])
    if mtp and not meta.get("mtp", False):
        raise CheckpointError(f"{path}: the checkpoint holds no multi-token-prediction module")
    mtp = bool(meta.get("mtp", False))
    specs = param_specs(cfg, mtp=mtp)
    common = dict(cfg=cfg, hf_config=meta.get("hf_config") or {}, tokenizer_files=_tokenizer_files(path), mtp=mtp)
    if meta.get("format", 1) == FORMAT:
        return _stored_source(path, specs, np.dtype(cfg.param_dtype), common)
    return _orbax_source(path, specs, np.dtype(cfg.param_dtype), common)


def _stored_source(path: str, specs: dict, dtype: np.dtype, common: dict) -> ParamSource:
    """Format 2: read rows of the stored tensors (a slice of experts or of the vocabulary is a byte range)."""
    files: dict[str, SafetensorsFile] = {}
    for fname, names in iter_checkpoint_files(path):
        f = SafetensorsFile(fname)
        held = set(f.names())
        missing = [n for n in names if n not in held]
        if missing:
            raise CheckpointError(f"{fname}: index lists tensor {missing[0]!r} that the file does not hold")
        files |= dict.fromkeys(names, f)
    for name, dt, shape in stored_layout(specs, common["cfg"], dtype):
        f = files.get(name)
        if f is None:
            raise CheckpointError(f"{path}: tensor {name!r} missing from the checkpoint")
        if f.shape(name) != tuple(shape) or f.dtype(name) != dt:
            raise CheckpointError(
                f"{f.path}: tensor {name!r} is {f.dtype(name)}{list(f.shape(name))}, expected {dt}{list(shape)}"
            )

    def pieces(p: tuple[str, ...]) -> Pieces:
        stacked = is_stacked(source.spec(p))

        def load(lead, rest):
            name = stored_name(p, lead[0] if stacked else None)
            if not rest:
                return files[name].read(name)
            return files[name].read(name, (rest[0].start, rest[0].stop))[(slice(None), *rest[1:])]

        return Pieces(1 if stacked else 0, load)

    source = ParamSource(specs=specs, location=path, dtype=dtype, pieces=pieces, **common)
    return source


def params_candidates(path: str) -> list[str]:
    """Parameter directories to try, newest first: ``params/`` of a format-1 r1jax checkpoint, or the finalised
    steps of a training run (``checkpoints/<step>/params``; orbax renames a step into place once it is complete)."""
    if os.path.isdir(os.path.join(path, "params")):
        return [os.path.join(path, "params")]
    root = os.path.join(path, "checkpoints")
    steps = sorted((int(d) for d in os.listdir(root) if d.isdigit()), reverse=True) if os.path.isdir(root) else []
    return [os.path.join(root, str(s), "params") for s in steps if os.path.isdir(os.path.join(root, str(s), "params"))]


def _orbax_source(path: str, specs: dict, dtype: np.dtype, common: dict) -> ParamSource:
    """Format 1 and training runs (orbax, newest complete step): a read opens the parameter's stored array with
    tensorstore (orbax's own storage layer) and reads only the requested box, so a slice of one layer or expert of a
    stacked parameter costs that slice, not the stack."""
    candidates = params_candidates(path)
    if not candidates:
        raise CheckpointError(f"{path}: {META} but no params/ or checkpoints/<step>/params")
    params_dir = os.path.abspath(candidates[0])
    layout = _orbax_layout(params_dir)
    arrays: dict = {}

    def array(p: tuple[str, ...]):
        if p not in arrays:
            import tensorstore as ts

            name = ".".join(p)  # orbax names a dict leaf by its keys joined with "."
            kv = {"driver": "ocdbt", "base": f"file://{params_dir}", "path": name} if layout["use_ocdbt"] else {
                "driver": "file", "path": os.path.join(params_dir, name)
            }  # fmt: skip
            try:
                driver = "zarr3" if layout["use_zarr3"] else "zarr"  # a missing chunk is an error, not zeros:
                a = ts.open({"driver": driver, "kvstore": kv, "fill_missing_data_reads": False}, read=True).result()
            except Exception as e:  # tensorstore reports a missing or damaged array as ValueError
                why = str(e).splitlines()[0][:120]
                raise CheckpointError(f"{params_dir}: cannot open {'/'.join(p)} ({why})") from None
            shape = source.spec(p).shape
            if tuple(a.shape) != tuple(shape):
                raise CheckpointError(f"{params_dir}: {'/'.join(p)} is {list(a.shape)}, expected {list(shape)}")
            arrays[p] = a
        return arrays[p]

    def pieces(p: tuple[str, ...]) -> Pieces:
        def load(lead, rest):
            a = array(p)
            try:
                return np.asarray(a[rest].read().result())
            except Exception as e:  # a truncated or missing chunk
                why = str(e).splitlines()[0][:120]
                raise CheckpointError(f"{params_dir}: cannot read {'/'.join(p)} ({why})") from None

        return Pieces(0, load)

    source = ParamSource(specs=specs, location=path, dtype=dtype, pieces=pieces, **common)
    return source


def _orbax_layout(params_dir: str) -> dict:
    """How orbax stored a parameter tree (``_METADATA``: OCDBT or one directory per array; zarr v2 or v3)."""
    try:
        meta = json.loads(Path(params_dir, "_METADATA").read_text())
        return {"use_ocdbt": bool(meta.get("use_ocdbt", True)), "use_zarr3": bool(meta.get("use_zarr3", False))}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{params_dir}/_METADATA: unreadable orbax metadata ({e.__class__.__name__})") from None


GATHER_WHOLE = 64 << 20  # bytes: parameters up to this size come to the host whole, larger ones slice by slice


def from_model(model) -> ParamSource:
    """A loaded ``Transformer``'s parameters as a source: a read brings only its slice to the host (gathered from
    every process's shards when the arrays span several processes, which must then all read the same slices), so
    exporting a sharded model holds one tensor at a time."""
    params = model.param_dict()
    mtp = "mtp" in params
    specs = param_specs(model.cfg, mtp=mtp)
    last: dict = {}  # the last small parameter, gathered whole: one collective per parameter, not per slice

    def pieces(path: tuple[str, ...]) -> Pieces:
        a = params
        for k in path:
            a = a[k]

        def load(lead, rest):
            if a.nbytes > GATHER_WHOLE:
                return _gather(a[rest] if rest else a)
            if path not in last:
                last.clear()
                last[path] = _gather(a)
            return last[path][rest]

        return Pieces(0, load)

    dtype = np.dtype(jax.numpy.dtype(model.cfg.param_dtype))
    return ParamSource(
        model.cfg, dict(model.hf_config), dict(model.tokenizer_files), mtp, specs, "<model>", dtype, pieces
    )


def _gather(a: jax.Array) -> np.ndarray:
    if a.is_fully_addressable:
        return np.asarray(jax.device_get(a))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(a, tiled=True))


def nbytes(specs: dict, dtype) -> int:
    """Bytes of the whole parameter tree with undeclared dtypes stored as ``dtype``."""
    return sum(math.prod(s.shape) * np.dtype(s.dtype or dtype).itemsize for _, s in leaves(specs))


# --- writing format 2 -------------------------------------------------------------------------------------------------
def piece_depths(cfg: ModelConfig, *, mtp: bool) -> dict[tuple[str, ...], int]:
    """Per parameter, how many leading axes one HF tensor covers (layer, expert): the unit a conversion streams."""
    return {e.path: len(e.index) for e in hf.entries(cfg, mtp=mtp)}


def stored_pieces(src: ParamSource, dtype) -> Iterator[np.ndarray]:
    """The data of ``stored_layout(src.specs, ...)`` in order, one HF-tensor-sized piece at a time."""
    depths = piece_depths(src.cfg, mtp=src.mtp)
    for path, spec in leaves(src.specs):
        dt = np.dtype(spec.dtype) if spec.dtype else np.dtype(dtype)
        for lead in itertools.product(*map(range, spec.shape[: depths.get(path, 0)])):
            yield src.read(path, lead, dt)


def write_checkpoint(
    src: ParamSource,
    out_dir: str,
    *,
    dtype=None,
    tokenizer_files: dict[str, str] | None = None,
    shard_bytes: int = 4 << 30,
    progress: bool = True,
) -> ModelConfig:
    """Stream ``src`` into a format-2 r1jax checkpoint at ``out_dir``, one HF-tensor-sized piece at a time (peak
    memory: a few tensors). ``dtype`` (default: the source's) is the stored dtype of parameters that declare none;
    the saved config's ``dtype``/``param_dtype`` say so. The directory appears, complete, only at the end; the
    same inputs give byte-identical files. On several processes (a sharded model's reads are collectives) every
    process reads and process 0 writes. Returns the saved config."""
    dtype = np.dtype(dtype) if dtype is not None else src.dtype
    name = hf.dtype_name(dtype)
    cfg = src.cfg if name == src.cfg.param_dtype else src.cfg.replace(dtype=name, param_dtype=name)
    if jax.process_index() != 0:
        for _ in stored_pieces(src, dtype):
            pass
        return cfg
    tmp = hf.partial_dir(out_dir)
    try:
        layout = stored_layout(src.specs, cfg, dtype)
        write_sharded(
            tmp,
            layout,
            stored_pieces(src, dtype),
            shard_bytes=shard_bytes,
            metadata={"format": "r1jax"},
            progress="convert" if progress else None,
        )
        meta = checkpoint_meta(cfg, src.hf_config, mtp=src.mtp, fmt=FORMAT)
        files = src.tokenizer_files if tokenizer_files is None else tokenizer_files
        try:
            for fname, text in sorted(files.items()):
                Path(tmp, fname).write_text(text)
            Path(tmp, META).write_text(json.dumps(meta, indent=2))
        except OSError as e:
            raise CheckpointError(f"{tmp}: write failed ({e.strerror})") from None
        hf._replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return cfg
