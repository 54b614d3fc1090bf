"""Two processes on localhost (4 fake CPU devices each, gloo collectives) train on one global mesh and agree with a
single-process run: per-process batch rows enter through ``jax.make_array_from_process_local_data``; the updated
parameters go through an orbax save and a sharded restore (each process writes and reads its own shards) between
the two steps."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
MESH = {"fsdp": 4, "expert": 2}


def _model():
    sys.path.insert(0, HERE)
    from test_sharding import V3

    return V3


def _tokens(cfg):
    return np.asarray(jax.random.randint(jax.random.key(1), (8, 8), 0, cfg.vocab_size, jnp.int32))


def _step(params, tokens, cfg):
    from r1jax.model import forward, token_logprobs

    def loss_fn(p):
        logits, _ = forward(p, tokens, cfg)
        return -token_logprobs(logits[:, :-1], tokens[:, 1:]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    new = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    return loss, new, sum(jnp.sum(g * g) for g in jax.tree.leaves(grads))


def _save_restore(params, shardings, path: str):
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params)
        ckptr.wait_until_finished()
        target = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), params, shardings)
        return ckptr.restore(path, target)


def _run(mesh, cfg, tokens_for, ckpt: str):
    from functools import partial

    from r1jax import sharding
    from r1jax.model import init_params, param_specs

    shardings = sharding.param_shardings(param_specs(cfg), mesh)
    params = jax.jit(partial(init_params, cfg, std=0.2), out_shardings=shardings)(jax.random.key(0))
    tokens = tokens_for(sharding.batch_sharding(mesh, (8, 8)))
    with jax.set_mesh(mesh):
        step = jax.jit(partial(_step, cfg=cfg), out_shardings=(None, shardings, None))
        loss1, params, gnorm = step(params, tokens)
    restored = _save_restore(params, shardings, ckpt)
    same = jax.jit(lambda a, b: jnp.all(jnp.stack([jnp.array_equal(x, y) for x, y in zip(a, b, strict=True)])))
    identical = bool(same(jax.tree.leaves(params), jax.tree.leaves(restored)))
    assert all(r.sharding == s for r, s in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings), strict=True))
    with jax.set_mesh(mesh):
        loss2, _, _ = step(restored, tokens)
    return [float(loss1), float(loss2), float(gnorm), float(identical)]


def _worker(pid: int, port: int, out: str, ckpt: str):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid, local_device_ids=list(range(4)))
    from r1jax import sharding

    cfg = _model()
    mesh = sharding.make_mesh(MESH)
    glob = _tokens(cfg)

    def local(sh):
        rows = sorted({idx[0].indices(8)[:2] for d, idx in sh.addressable_devices_indices_map((8, 8)).items()})
        lo, hi = rows[0][0], rows[-1][1]
        return jax.make_array_from_process_local_data(sh, glob[lo:hi], (8, 8))

    result = _run(mesh, cfg, local, ckpt)
    if pid == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_agree_with_one(tmp_path):
    out = str(tmp_path / "result.json")
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["PYTHONPATH"] = os.pathsep.join([HERE, env.get("PYTHONPATH", "")])
    code = f"import test_multihost as t; t._worker({{}}, {port}, {out!r}, {str(tmp_path / 'ckpt2')!r})"
    procs = [
        subprocess.Popen([sys.executable, "-c", code.format(pid)], env=env, cwd=HERE, stderr=subprocess.PIPE)
        for pid in range(2)
    ]
    errs = [p.communicate(timeout=600)[1].decode()[-2000:] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    from r1jax import sharding

    cfg = _model()
    want = _run(
        sharding.make_mesh({"data": 8}), cfg, lambda sh: jax.device_put(_tokens(cfg), sh), str(tmp_path / "ckpt1")
    )
    assert want[3] == 1.0  # restored parameters are bitwise the saved ones
    with open(out) as f:
        got = json.load(f)
    np.testing.assert_allclose(got, want, rtol=1e-4)
