"""Streaming checkpoint IO: parameter slices read from only the tensors they need, ``r1jax convert`` to the
safetensors checkpoint format one tensor at a time (byte-identical after a kill and rerun), ``r1jax export`` that
transformers loads, bad input as one line naming the file, and the convert's peak memory in a real subprocess."""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import r1jax
from r1jax import checkpoint, hf, param_source, safetensors_io
from r1jax.cli import main
from r1jax.errors import CheckpointError
from r1jax.model import DENSE_LAYERS, MOE_LAYERS, param_specs
from r1jax.param_source import open_source
from tests import hf_tiny

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import bench_checkpoint as bench  # noqa: E402
import peak_rss  # noqa: E402

# hidden 256 with q-LoRA 96, kv-LoRA 64: 128-blocks with ragged edges; 8 experts, a dense layer, the MTP layer
SMALL = dict(hidden=256, layers=3, experts=8, vocab=512)
ENV = dict(os.environ, JAX_PLATFORMS="cpu")


@pytest.fixture(scope="module")
def fp8_src(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8") / "src"
    bench.write_fp8_checkpoint(str(path), bench.v3_config(**SMALL), shard_bytes=256 << 10)
    assert len(list(path.glob("*.safetensors"))) > 4
    return path


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _dequant_reference(directory, key: str) -> np.ndarray:
    """The HF-layout float32 tensor as torch computes it from safetensors' own reader."""
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    state = load_file(directory / index[key])
    w = state[key].float()
    if key + "_scale_inv" in state:
        s = state[key + "_scale_inv"].float().repeat_interleave(128, 0).repeat_interleave(128, 1)
        w = w * s[: w.shape[0], : w.shape[1]]
    return w.numpy()


def test_slice_reads_only_its_tensors(fp8_src, monkeypatch):
    src = open_source(str(fp8_src), mtp=True)
    touched = []
    orig = hf.HFTensors.read
    monkeypatch.setattr(hf.HFTensors, "read", lambda self, key: touched.append(key) or orig(self, key))

    got = src.read((MOE_LAYERS, "mlp", "experts", "gate"), (1, slice(2, 4)))  # moe layer 1 = HF layer 2
    assert touched == [f"model.layers.2.mlp.experts.{j}.gate_proj.weight" for j in (2, 3)]
    want = np.stack([_dequant_reference(fp8_src, k).T for k in touched])
    np.testing.assert_array_equal(got, want)

    touched.clear()
    kv_b = src.read((MOE_LAYERS, "attn", "kv_b"), (slice(0, 2), slice(None), slice(2, 5)))  # heads 2..4
    assert touched == ["model.layers.1.self_attn.kv_b_proj.weight", "model.layers.2.self_attn.kv_b_proj.weight"]
    c, h = src.cfg.kv_lora_rank, src.cfg.n_heads
    full = np.stack([_dequant_reference(fp8_src, k).T.reshape(c, h, -1) for k in touched])
    np.testing.assert_array_equal(kv_b, full[:, :, 2:5])

    touched.clear()
    mtp_q = src.read(("mtp", "block", "attn", "q_a"), 0)  # the MTP module is HF layer n_layers
    assert touched == [f"model.layers.{src.cfg.n_layers}.self_attn.q_a_proj.weight"]
    np.testing.assert_array_equal(mtp_q, _dequant_reference(fp8_src, touched[0]).T)
    rows = src.read(("embed",), slice(100, 110), dtype=ml_dtypes.bfloat16)
    assert rows.dtype == ml_dtypes.bfloat16 and rows.shape == (10, src.cfg.d_model)


def test_ue8m0_scales_as_float32_or_exponents(tmp_path):
    cfg = bench.v3_config(hidden=256, layers=2, experts=4, vocab=256, ue8m0=True)
    f32_dir = tmp_path / "f32"
    bench.write_fp8_checkpoint(str(f32_dir), cfg, shard_bytes=128 << 10)
    e8m0_dir = _copy(f32_dir, tmp_path / "e8m0")
    for f in e8m0_dir.glob("*.safetensors"):
        st = safetensors_io.SafetensorsFile(str(f))
        tensors = {n: st.read(n) for n in st.names()}
        for n in tensors:
            if n.endswith("_scale_inv"):  # the biased exponent byte (V3.1's e8m0 scales)
                tensors[n] = tensors[n].astype(ml_dtypes.float8_e8m0fnu)
        safetensors_io.save_file(tensors, str(f))
    a, b = open_source(str(f32_dir)), open_source(str(e8m0_dir))
    for path in a.paths():
        np.testing.assert_array_equal(a.read(path), b.read(path))
    key = "model.layers.1.mlp.experts.0.up_proj.weight"
    np.testing.assert_array_equal(
        a.read((MOE_LAYERS, "mlp", "experts", "up"), (0, 0)), _dequant_reference(f32_dir, key).T
    )

    bad = _copy(f32_dir, tmp_path / "bad")
    conf = json.loads((bad / "config.json").read_text())
    conf["quantization_config"].pop("scale_fmt")
    (bad / "config.json").write_text(json.dumps(conf))
    for f in bad.glob("*.safetensors"):  # float32 scales that are not powers of two, declared ue8m0 below
        st = safetensors_io.SafetensorsFile(str(f))
        tensors = {n: st.read(n) * (np.float32(1.5) if n.endswith("_scale_inv") else 1) for n in st.names()}
        safetensors_io.save_file({n: t.astype(st.dtype(n)) for n, t in tensors.items()}, str(f))
    open_source(str(bad)).read((MOE_LAYERS, "mlp", "experts", "up"), (0, 0))  # fine without ue8m0
    conf["quantization_config"]["scale_fmt"] = "ue8m0"
    (bad / "config.json").write_text(json.dumps(conf))
    with pytest.raises(r1jax.errors.CheckpointError, match="not powers of two"):
        open_source(str(bad)).read((MOE_LAYERS, "mlp", "experts", "up"), (0, 0))


def _files(directory) -> dict[str, bytes]:
    return {f: (directory / f).read_bytes() for f in sorted(os.listdir(directory))}


def test_convert_streams_to_safetensors_checkpoint(fp8_src, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert main(["convert", str(fp8_src), str(out), "--mtp"]) == 0
    meta = json.loads((out / "r1jax.json").read_text())
    assert meta["format"] == 2 and meta["mtp"] and meta["config"]["param_dtype"] == "float32"
    assert "model.safetensors.index.json" in os.listdir(out)
    src, ckpt = open_source(str(fp8_src), mtp=True), open_source(str(out))
    assert ckpt.mtp and ckpt.cfg == src.cfg
    for path in src.paths():
        np.testing.assert_array_equal(ckpt.read(path), src.read(path), err_msg="/".join(path))
    # a slice of a stored checkpoint is a byte range of one layer's tensor
    np.testing.assert_array_equal(
        ckpt.read((MOE_LAYERS, "mlp", "experts", "down"), (1, slice(3, 6), slice(None), 7)),
        src.read((MOE_LAYERS, "mlp", "experts", "down"), (1, slice(3, 6), slice(None), 7)),
    )

    bf16 = tmp_path / "bf16"
    assert main(["convert", str(fp8_src), str(bf16), "--dtype", "bfloat16"]) == 0
    small = open_source(str(bf16))
    assert small.cfg.param_dtype == "bfloat16" and not small.mtp
    router = (MOE_LAYERS, "mlp", "router")
    assert small.read(router).dtype == np.float32  # declared float32: kept
    gate = (MOE_LAYERS, "mlp", "experts", "gate")
    np.testing.assert_array_equal(small.read(gate), src.read(gate).astype(ml_dtypes.bfloat16))

    tokens = np.random.RandomState(0).randint(3, 500, (2, 9))
    want = np.asarray(r1jax.load(str(fp8_src))(tokens))
    np.testing.assert_array_equal(np.asarray(r1jax.load(str(out))(tokens)), want)


def test_rerun_after_kill_is_byte_identical(fp8_src, tmp_path, capsys):
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(["convert", str(fp8_src), str(ref), "--mtp"]) == 0
    slow = (
        "import sys, time\n"
        "from r1jax import safetensors_io as s\n"
        "w = s.StreamWriter.write\n"
        "s.StreamWriter.write = lambda self, a: (time.sleep(0.05), w(self, a))[1]\n"
        "from r1jax.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    p = subprocess.Popen([sys.executable, "-c", slow, "convert", str(fp8_src), str(out), "--mtp"], env=ENV)
    partial = tmp_path / ".r1jax-partial-out"
    deadline = time.time() + 120
    while sum(f.stat().st_size for f in partial.glob("*")) < 1 << 20 and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert partial.exists() and not out.exists()  # killed mid-way: only the temporary directory
    assert main(["convert", str(fp8_src), str(out), "--mtp"]) == 0
    assert not partial.exists()
    assert _files(out) == _files(ref)


@pytest.mark.parametrize("case", ["deepseek_v3", "qwen2"])
def test_export_loads_in_transformers(case, tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    ref = hf_tiny.build(case, str(tmp_path / "src"))
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "ckpt")]) == 0
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    tokens = np.random.RandomState(1).randint(3, 96, (2, 8))
    np.testing.assert_array_equal(hf_tiny.hf_logits(back, tokens), hf_tiny.hf_logits(ref, tokens))

    # from a model whose parameters are sharded over 8 devices, gathered one HF tensor at a time: the same files
    from r1jax.sharding import make_mesh

    model = r1jax.load(str(tmp_path / "ckpt"), mesh=make_mesh({"fsdp": 2, "tensor": 2, "expert": 2}))
    monkeypatch.setattr(param_source, "GATHER_WHOLE", 0)  # every HF tensor gathered on its own, as for big ones
    r1jax.export_hf(model, str(tmp_path / "from_mesh"))
    shards = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    assert shards == sorted(p.name for p in (tmp_path / "from_mesh").glob("*.safetensors"))
    for name in shards:
        assert (tmp_path / "hf" / name).read_bytes() == (tmp_path / "from_mesh" / name).read_bytes()

    # from an orbax (format 1) checkpoint, read box by box with tensorstore: the same files again
    _save_format_1(r1jax.load(str(tmp_path / "src")), tmp_path / "orbax")
    assert main(["export", str(tmp_path / "orbax"), str(tmp_path / "from_orbax")]) == 0
    for name in shards:
        assert (tmp_path / "hf" / name).read_bytes() == (tmp_path / "from_orbax" / name).read_bytes()

    # and ``save`` writes format 2, which exports to the same files once more
    checkpoint.save(r1jax.load(str(tmp_path / "src")), str(tmp_path / "saved"))
    assert json.loads((tmp_path / "saved" / param_source.META).read_text())["format"] == param_source.FORMAT
    assert main(["export", str(tmp_path / "saved"), str(tmp_path / "from_saved")]) == 0
    for name in shards:
        assert (tmp_path / "hf" / name).read_bytes() == (tmp_path / "from_saved" / name).read_bytes()


def _save_format_1(model, out) -> None:
    """An r1jax checkpoint as format 1 wrote it (orbax ``params/`` + ``r1jax.json``), which ``load`` still reads."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save((out / "params").absolute(), model.param_dict())
    meta = param_source.checkpoint_meta(model.cfg, model.hf_config, mtp=False, fmt=1)
    (out / param_source.META).write_text(json.dumps(meta))


def test_orbax_boxes_equal_the_saved_arrays(tmp_path):
    """An orbax parameter tree read through ``open_source`` (box by box with tensorstore, as for a run's steps):
    every parameter, and a box of each stacked one, equals the saved array; unreadable metadata is one error."""
    from r1jax.model import Transformer
    from tests.test_sharding import V3

    model = Transformer.random(V3, 0)
    _save_format_1(model, tmp_path / "f1")
    src = open_source(str(tmp_path / "f1"))
    params = model.param_dict()
    for path, spec in param_source.leaves(src.specs):
        whole = np.asarray(_at(params, path))
        np.testing.assert_array_equal(src.read(path), whole)
        if len(spec.shape) >= 3:
            box = (spec.shape[0] - 1, slice(1, spec.shape[1]))
            np.testing.assert_array_equal(src.read(path, box), whole[box])
    (tmp_path / "f1" / "params" / "_METADATA").write_text("{")
    with pytest.raises(CheckpointError, match="_METADATA"):
        open_source(str(tmp_path / "f1"))


def _at(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def test_export_of_a_model_without_hf_config(tmp_path):
    """A model trained from scratch (no source config.json) exports a config that transformers and r1jax read back
    to the same architecture and logits."""
    from transformers import AutoModelForCausalLM

    from r1jax.model import Transformer
    from tests.test_sharding import V3

    model = Transformer.random(V3.replace(rope_interleave=True), 0)
    r1jax.export_hf(model, str(tmp_path / "hf"))
    back = r1jax.load(str(tmp_path / "hf"))
    assert back.cfg == model.cfg.replace(n_kv_heads=model.cfg.num_kv_heads)  # None means n_heads
    tokens = np.random.RandomState(1).randint(3, V3.vocab_size, (2, 8))
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    np.testing.assert_allclose(hf_tiny.hf_logits(theirs, tokens), np.asarray(model(tokens)), rtol=1e-4, atol=1e-5)


# --- bad input --------------------------------------------------------------------------------------------------------
def _assert_fails(capsys, src, out, *, names: str, match: str):
    code = main(["convert", str(src), str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("r1jax: error:"), err
    assert names in err and match in err, err
    assert not out.exists()
    assert not [p for p in os.listdir(out.parent) if p.startswith(".r1jax")]  # nothing half-written


def _shards(directory):
    return sorted(directory.glob("model-*.safetensors"))


def test_truncated_shard(fp8_src, tmp_path, capsys):
    d = _copy(fp8_src, tmp_path / "m")
    shard = _shards(d)[2]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    _assert_fails(capsys, d, tmp_path / "out", names=str(shard), match="outside the file")


def test_index_names_a_missing_file(fp8_src, tmp_path, capsys):
    d = _copy(fp8_src, tmp_path / "m")
    gone = _shards(d)[1]
    gone.unlink()
    _assert_fails(capsys, d, tmp_path / "out", names="model.safetensors.index.json", match=f"{gone.name} is missing")


def test_scale_of_the_wrong_shape(fp8_src, tmp_path, capsys):
    d = _copy(fp8_src, tmp_path / "m")
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.2.self_attn.q_b_proj.weight_scale_inv"
    shard = d / index[key]
    st = safetensors_io.SafetensorsFile(str(shard))
    tensors = {n: st.read(n) for n in st.names()}
    tensors[key] = np.ones((tensors[key].shape[0] + 1, tensors[key].shape[1]), np.float32)
    safetensors_io.save_file(tensors, str(shard))
    _assert_fails(capsys, d, tmp_path / "out", names=str(shard), match="q_b_proj.weight_scale_inv' has shape")


def test_disk_fills_during_conversion(fp8_src, tmp_path, capsys, monkeypatch):
    calls = []
    write = os.write

    def filling(fd, data):
        calls.append(len(data))
        if len(calls) > 40:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(fd, data)

    monkeypatch.setattr(safetensors_io.os, "write", filling)
    _assert_fails(capsys, fp8_src, tmp_path / "out", names=".r1jax-partial-out/model.safetensors", match="disk full")


def test_file_size_limit_in_a_real_process(fp8_src, tmp_path):
    """RLIMIT_FSIZE in the child: the write fails with EFBIG mid-shard; one line, exit 2, nothing left."""

    limited = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
        "from r1jax.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    out = tmp_path / "out"
    p = subprocess.run(
        [sys.executable, "-c", limited, "convert", str(fp8_src), str(out)], capture_output=True, text=True, env=ENV
    )
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("r1jax: error: ") and "disk full (File too large)" in lines[0]
    assert ".r1jax-partial-out/model.safetensors" in lines[0]
    assert os.listdir(tmp_path) == []


# --- memory -----------------------------------------------------------------------------------------------------------
def _peak_rss(argv) -> int:
    return peak_rss.measure(argv, ENV)[1]


def test_convert_peak_memory_is_a_few_tensors(tmp_path):
    """98M parameters of fp8 V3 (392 MB as float32): the convert process grows by at most half the float32 model
    over the bare imports, and by a few of its largest tensors (conversion used to assemble the whole float32 model
    first, then save it)."""
    src = tmp_path / "src"
    cfg = bench.v3_config(hidden=512, layers=6, experts=32, vocab=8192)
    bench.write_fp8_checkpoint(str(src), cfg, shard_bytes=8 << 20)
    f32 = param_source.nbytes(param_specs(hf.config_from_hf(cfg), mtp=True), np.float32)
    assert f32 > 250e6
    base = _peak_rss([sys.executable, "-c", bench.BASELINE])
    peak = _peak_rss([sys.executable, "-m", "r1jax", "convert", str(src), str(tmp_path / "ckpt"), "--mtp"])
    largest = max(np.prod(s) for _, s, _ in bench.hf_tensors(cfg)) * 4
    assert peak - base <= f32 / 2, (peak - base, f32)
    assert peak - base <= 8 * largest, (peak - base, largest)  # a few tensors
    assert sum(os.path.getsize(tmp_path / "ckpt" / f) for f in os.listdir(tmp_path / "ckpt")) > f32


def test_stored_layout_is_one_tensor_per_layer():
    cfg = hf.config_from_hf(bench.v3_config(**SMALL))
    names = [n for n, _, _ in param_source.stored_layout(param_specs(cfg), cfg, np.float32)]
    assert "embed" in names and f"{MOE_LAYERS}/0/mlp/experts/gate" in names and f"{DENSE_LAYERS}/0/attn/q_a" in names
    assert len(names) == len(set(names))


# --- export from two processes ----------------------------------------------------------------------------------------
def _export_worker(pid: int, port: int, ckpt: str, out: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid, local_device_ids=list(range(4)))
    from r1jax.sharding import make_mesh

    model = r1jax.load(ckpt, mesh=make_mesh({"fsdp": 4, "expert": 2}))  # spans both processes' devices
    assert not model.param_dict()["embed"].is_fully_addressable
    r1jax.export_hf(model, out)  # process 0 writes; both take part in the gathers
    jax.distributed.shutdown()


def test_export_from_two_processes(tmp_path, capsys):
    hf_tiny.build("deepseek_v3", str(tmp_path / "src"))
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "ckpt")]) == 0
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "one")]) == 0
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["PYTHONPATH"] = os.pathsep.join([here, os.path.dirname(here), env.get("PYTHONPATH", "")])
    args = f"{port}, {str(tmp_path / 'ckpt')!r}, {str(tmp_path / 'two')!r}"
    code = f"import test_convert as t; t._export_worker({{}}, {args})"
    procs = [
        subprocess.Popen([sys.executable, "-c", code.format(pid)], env=env, cwd=here, stderr=subprocess.PIPE)
        for pid in range(2)
    ]
    errs = [p.communicate(timeout=600)[1].decode()[-2000:] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    assert _files(tmp_path / "two") == _files(tmp_path / "one")
