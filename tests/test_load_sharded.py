"""Models on meshes: per-host sharded loading (2 processes x 4 CPU devices, peak RSS per process below the float32
model), any mesh (``jax.make_mesh``'s Explicit axes and Auto ones), an SFT step on 8 devices with expert-parallel
dispatch equal to one device, the run's numerics over the checkpoint's architecture, and the mesh errors."""

import json
import math
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import r1jax
from r1jax import checkpoint, cli, expert_parallel, train
from r1jax.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from r1jax.data.tokenizer import ByteTokenizer
from r1jax.errors import CheckpointError
from r1jax.hf import config_from_hf
from r1jax.model import ParamSpec, Transformer, forward, param_specs
from r1jax.sharding import batch_sharding, make_mesh, normalize_mesh, on_mesh, put, to_host

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tools"))

from bench_checkpoint import v3_config, write_fp8_checkpoint  # noqa: E402
from test_sharding import V3  # noqa: E402

AXIS_TYPES = {"explicit": jax.sharding.AxisType.Explicit, "auto": jax.sharding.AxisType.Auto}
# A V3-style fp8 checkpoint of ~0.2B parameters, mostly routed experts: big enough that a whole float32 copy (0.8 GB)
# dwarfs a process's baseline (~0.3 GB: the interpreter, JAX and XLA's compiled forward)
BIG_HF = v3_config(hidden=512, layers=4, experts=160, vocab=8192)
BIG = config_from_hf(BIG_HF)
# stored bf16 (half the memory), computed in f32 (one process and two agree to rounding)
BIG_NUMERICS = {"param_dtype": "bfloat16", "dtype": "float32"}


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def _jax_mesh(kind: str) -> jax.sharding.Mesh:
    """The mesh a user builds the standard way: ``jax.make_mesh`` over fsdp x expert."""
    return jax.make_mesh((4, 2), ("fsdp", "expert"), axis_types=(AXIS_TYPES[kind],) * 2)


@pytest.fixture(scope="module")
def tiny_v3(tmp_path_factory):
    import hf_tiny  # torch: imported by the fixtures that need it, not by the 2-process workers

    path = tmp_path_factory.mktemp("v3") / "hf"
    hf_tiny.build("deepseek_v3", str(path))
    return str(path)


@pytest.mark.parametrize("kind", AXIS_TYPES)
def test_load_on_any_mesh_equals_one_device(tiny_v3, kind):
    """``r1jax.load(path, mesh=jax.make_mesh(...))`` with Explicit or Auto axes: every parameter sharded by the
    rules, logits (plain call and under the mesh) equal one device's."""
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (8, 8), 0, 96))
    want = np.asarray(r1jax.load(tiny_v3)(tokens))
    model = r1jax.load(tiny_v3, mesh=_jax_mesh(kind))
    gate = model.param_dict()["moe_layers"]["mlp"]["experts"]["gate"]
    assert gate.sharding.spec == jax.sharding.PartitionSpec(None, "expert", "fsdp", None)
    assert _rel(model(tokens), want) < 1e-4
    mesh = normalize_mesh(_jax_mesh(kind))
    with on_mesh(mesh):
        logits = jax.jit(lambda p, t: forward(p, t, model.cfg)[0])(
            model.param_dict(), put(tokens, batch_sharding(mesh, tokens.shape))
        )
    assert _rel(logits, want) < 1e-4


def _sft_batch():
    return [{"prompt_text": f"{a} + {a + 3} =", "completion": f" {2 * a + 3}"} for a in range(8)]


def _sft_step(model_cfg: ModelConfig, mesh):
    cfg = TrainConfig(
        stage="sft", model=model_cfg, sft_batch_size=8, micro_batch_size=4, data=DataConfig(seq_len=16),
        optim=OptimConfig(lr=1e-2, router_bias_gamma=0.01),
    )  # fmt: skip
    stage = train.SFTStage(cfg, model_cfg, ByteTokenizer(), mesh)
    state = stage.init(Transformer.random(model_cfg, 0, mesh=mesh).param_dict())
    state, metrics = stage.step(state, _sft_batch(), jax.random.key(0))
    return jax.tree.map(to_host, state["params"]), metrics


@pytest.mark.parametrize("kind", AXIS_TYPES)
def test_sft_step_on_mesh_equals_one_device(kind, monkeypatch):
    """SFT (cold start, rejection-sampling SFT, distillation) runs on the run's mesh: the step on 8 devices
    (fsdp x expert, expert-parallel dispatch active, remat) gives the one-device parameters and loss."""
    model_cfg = V3.replace(vocab_size=320, remat=True)  # the byte tokenizer's 259 ids fit
    want, want_m = _sft_step(model_cfg, None)
    layouts = []
    real = expert_parallel.layout
    monkeypatch.setattr(expert_parallel, "layout", lambda *a, **k: layouts.append(real(*a, **k)) or layouts[-1])
    got, got_m = _sft_step(model_cfg, normalize_mesh(_jax_mesh(kind)))
    assert layouts and all(lay is not None for lay in layouts)  # the routed experts went through the dispatch
    assert abs(got_m["loss"] - want_m["loss"]) <= 1e-4 * abs(want_m["loss"])
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
        assert _rel(a, b) < 1e-4, jax.tree_util.keystr(path)


def _write_config(path, *, init: str, data: str, **extra) -> str:
    """A preset file: f32 master parameters, bf16 matmuls, remat with the "dots" policy, SFT on ``data``."""
    options = ", ".join(f"{k}={v!r}" for k, v in extra.items())
    path.write_text(
        "from r1jax.config import CheckpointConfig, DataConfig, ModelConfig, TrainConfig\n"
        "def config():\n"
        "    model = ModelConfig(arch='llama', vocab_size=8, d_model=8, n_layers=1, n_heads=2, ffw=8,\n"
        "                        dtype='bfloat16', param_dtype='float32', remat=True, remat_policy='dots')\n"
        f"    return TrainConfig(stage='sft', model=model, init={init!r}, steps=2, sft_batch_size=4,\n"
        f"                       data=DataConfig(name={data!r}, template='plain', seq_len=32),\n"
        f"                       checkpoint=CheckpointConfig(every=2, async_save=False), {options})\n"
    )
    return str(path)


@pytest.fixture(scope="module")
def bf16_hf(tmp_path_factory):
    """A bf16 Qwen2 HF checkpoint with a character tokenizer, and SFT data for it."""
    import hf_tiny
    import torch
    from test_sample_cmd import char_tokenizer_files

    root = tmp_path_factory.mktemp("numerics")
    hf = root / "hf"
    hf_tiny.build("qwen2", str(hf)).to(torch.bfloat16).save_pretrained(str(hf))
    for name, text in char_tokenizer_files().items():
        (hf / name).write_text(text)
    rows = [{"prompt": f"what is {a} + {a}?", "completion": f" {2 * a}", "answer": str(2 * a)} for a in range(8)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_train_from_checkpoint_keeps_the_presets_numerics(bf16_hf, tmp_path):
    """``train <preset> --set init=CKPT``: the checkpoint's architecture with the preset's numerics (f32 parameters,
    bf16 compute, remat and its policy), recorded in train_config.json; the saved checkpoint holds f32 parameters."""
    import orbax.checkpoint as ocp

    preset = _write_config(tmp_path / "preset.py", init="", data=str(bf16_hf / "data.jsonl"))
    out = tmp_path / "run"
    assert cli.main(["train", preset, "--out", str(out), "--set", f"init={bf16_hf / 'hf'}", "--no-progress"]) == 0
    model = json.loads((out / "train_config.json").read_text())["model"]
    assert (model["arch"], model["d_model"], model["vocab_size"], model["n_layers"]) == ("qwen2", 32, 96, 3)
    assert (model["dtype"], model["param_dtype"], model["remat"], model["remat_policy"]) == (
        "bfloat16", "float32", True, "dots",
    )  # fmt: skip
    stored = ocp.StandardCheckpointer().metadata(str((out / "checkpoints" / "2" / "params").absolute()))
    dtypes = {str(m.dtype) for m in jax.tree.leaves(stored.item_metadata)}
    assert dtypes == {"float32"}, dtypes
    from test_sample_cmd import char_tokenizer_files

    loaded = r1jax.load(str(out))
    assert loaded.cfg.remat and loaded.cfg.dtype == "bfloat16"
    assert {a.dtype for a in jax.tree.leaves(loaded.param_dict())} == {jnp.dtype("float32")}
    assert char_tokenizer_files().items() <= loaded.tokenizer_files.items()


def test_mesh_that_does_not_divide_the_batch(bf16_hf, tmp_path, capsys):
    preset = _write_config(tmp_path / "preset.py", init=str(bf16_hf / "hf"), data=str(bf16_hf / "data.jsonl"))
    assert cli.main(["train", preset, "--out", str(tmp_path / "run"), "--mesh", "fsdp=8", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "do not divide sft_batch_size = 4" in err, err


def test_checkpoint_that_does_not_fit_the_mesh(tmp_path, capsys):
    """A 4099-token vocabulary does not split over tensor=8: the 1M-element embedding would be whole on every
    device. One line naming the checkpoint, exit 2."""
    cfg = ModelConfig(arch="llama", vocab_size=4099, d_model=256, n_layers=1, n_heads=4, ffw=64)
    checkpoint.export_hf(Transformer.random(cfg), str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="does not fit the mesh"):
        r1jax.load(str(tmp_path / "hf"), mesh=make_mesh({"tensor": 8}))
    argv = ["generate", "--model", str(tmp_path / "hf"), "--prompt", "hi", "--mesh", "tensor=8"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"r1jax: error: {tmp_path / 'hf'}: its architecture"), err


# --- per-host loading: 2 processes x 4 devices --------------------------------------------------------------------
def _big_tokens():
    return np.asarray(jax.random.randint(jax.random.key(1), (8, 16), 0, BIG.vocab_size, jnp.int32))


def _logits_on(mesh, model):
    mesh = normalize_mesh(mesh)
    tokens = _big_tokens()
    with on_mesh(mesh):
        fn = jax.jit(lambda p, t: forward(p, t, model.cfg)[0])
        return to_host(fn(model.param_dict(), put(tokens, batch_sharding(mesh, tokens.shape))))


def _load_worker(pid: int, port: int, path: str, out: str):
    from peak_rss import own_peak_rss  # this process's own peak: ru_maxrss would count the pytest parent's

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid, local_device_ids=list(range(4)))
    mesh = _jax_mesh("explicit")  # 8 devices over both processes
    model = r1jax.load(path, mesh=mesh, numerics=BIG_NUMERICS)
    rss_load = own_peak_rss()
    logits = _logits_on(mesh, model)
    result = {"rss_load": rss_load, "rss": own_peak_rss()}
    if pid == 0:
        np.save(out + ".npy", logits)
    with open(f"{out}.{pid}.json", "w") as f:
        json.dump(result, f)
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def big_checkpoints(tmp_path_factory):
    """The ~0.2B model as an fp8 HF directory (several shards and an index)."""
    root = tmp_path_factory.mktemp("big")
    write_fp8_checkpoint(str(root / "hf"), BIG_HF, shard_bytes=100 << 20)
    return root


def test_two_processes_load_only_their_shards(big_checkpoints, tmp_path):
    """Each of 2 processes (4 devices each, one fsdp x expert mesh) reads only its devices' slices: its own peak RSS
    through the load (``VmHWM``: ``ru_maxrss`` would carry this pytest process's peak into the child) stays below
    the float32 size of the whole model (about 0.48 GB of the 0.79 GB bound: its shard in bf16 plus the
    interpreter), and the logits equal one process's at rel 1e-4. About a minute."""
    path = str(big_checkpoints / "hf")
    out, port = str(tmp_path / "out"), _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["PYTHONPATH"] = os.pathsep.join([HERE, os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    code = f"import test_load_sharded as t; t._load_worker({{}}, {port}, {path!r}, {out!r})"
    procs = [
        subprocess.Popen([sys.executable, "-c", code.format(pid)], env=env, cwd=HERE, stderr=subprocess.PIPE)
        for pid in range(2)
    ]
    errs = [p.communicate(timeout=900)[1].decode()[-3000:] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    f32_bytes = 4 * sum(math.prod(s.shape) for s in jax.tree.leaves(param_specs(BIG), is_leaf=_is_spec))
    for pid in range(2):
        with open(f"{out}.{pid}.json") as f:
            rss = json.load(f)["rss_load"]  # the forward's own buffers come after (XLA gathers f32 weights)
        assert rss < f32_bytes, (pid, rss / 2**20, f32_bytes / 2**20)
    want = _logits_on(make_mesh({"data": 1}, jax.devices()[:1]), r1jax.load(path, numerics=BIG_NUMERICS))
    assert _rel(np.load(out + ".npy"), want) < 1e-4
