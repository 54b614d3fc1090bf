"""Sharded equals unsharded: logits, loss and gradients of tiny V3 (MLA + MoE) and Qwen2 models on 8 CPU devices."""

import importlib
import itertools
import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from r1jax import sharding
from r1jax.config import ModelConfig
from r1jax.model import MOE_LAYERS, ParamSpec, forward, init_params, param_specs, token_logprobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

V3 = ModelConfig(
    arch="deepseek_v3", vocab_size=64, d_model=32, n_layers=2, n_heads=4, ffw=48, q_lora_rank=16, kv_lora_rank=16,
    qk_nope_dim=8, qk_rope_dim=4, v_head_dim=8, n_experts=8, n_shared_experts=1, experts_per_token=2, moe_ffw=16,
    first_k_dense=1, scoring="sigmoid", topk_method="noaux_tc", n_group=2, topk_group=1, norm_topk_prob=True,
    rope_interleave=True,
)  # fmt: skip
QWEN2 = ModelConfig(arch="qwen2", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffw=48, qkv_bias=True)
MODELS = {"v3": V3, "v3_remat": V3.replace(remat=True), "qwen2": QWEN2}
# the Pallas flash kernel per device under shard_map, against the single-device XLA attention reference
PALLAS = {"v3_pallas": "v3", "qwen2_pallas": "qwen2"}
MESHES = {
    "data8": {"data": 8},
    "fsdp8": {"fsdp": 8},
    "d2f2t2": {"data": 2, "fsdp": 2, "tensor": 2},
    "e4f2": {"expert": 4, "fsdp": 2},
    "t2f4": {"tensor": 2, "fsdp": 4},
    "t4f2": {"tensor": 4, "fsdp": 2},  # qwen2: 2 kv heads do not split over tensor 4, the 4 query heads do
}
CASES = [("v3", m) for m in MESHES] + [("v3_remat", "e4f2"), ("qwen2", "fsdp8"), ("qwen2", "d2f2t2"), ("qwen2", "t2f4")]
CASES += [("v3_pallas", "d2f2t2"), ("v3_pallas", "e4f2"), ("qwen2_pallas", "t2f4"), ("qwen2_pallas", "t4f2")]


def next_token_loss(params, tokens, cfg):
    logits, _ = forward(params, tokens, cfg)
    return -token_logprobs(logits[:, :-1], tokens[:, 1:]).mean(), logits


def _step(params, tokens, cfg):
    (loss, logits), grads = jax.value_and_grad(next_token_loss, has_aux=True)(params, tokens, cfg)
    return loss, logits, grads


@pytest.fixture(scope="module")
def reference():
    out = {}
    for name, cfg in MODELS.items():
        params = init_params(cfg, jax.random.key(0), std=0.2)
        if cfg.is_moe:  # a non-zero correction bias, so selection differs from plain top-k
            bias = jax.random.normal(jax.random.key(2), params[MOE_LAYERS]["mlp"]["router_bias"].shape) * 0.1
            params[MOE_LAYERS]["mlp"]["router_bias"] = bias
        tokens = jax.random.randint(jax.random.key(1), (8, 8), 0, cfg.vocab_size, jnp.int32)
        params = jax.device_put(params, jax.devices()[0])
        out[name] = (params, tokens, jax.jit(partial(_step, cfg=cfg))(params, tokens))
    return out


@pytest.mark.parametrize("model,mesh_name", CASES)
def test_sharded_equals_single_device(reference, model, mesh_name):
    cfg = MODELS[PALLAS.get(model, model)]
    cfg = cfg.replace(attention_impl="pallas") if model in PALLAS else cfg
    params, tokens, (loss0, logits0, grads0) = reference[PALLAS.get(model, model)]
    mesh = sharding.make_mesh(MESHES[mesh_name])
    specs = param_specs(cfg)
    sharding.check_rules(specs, mesh)
    shardings = sharding.param_shardings(specs, mesh)
    p = jax.device_put(params, shardings)
    t = jax.device_put(tokens, sharding.batch_sharding(mesh, tokens.shape))
    # parameters are really split: every shard has the shape the spec implies
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, ParamSpec))
    for leaf, spec in zip(jax.tree.leaves(p), spec_leaves, strict=True):
        pspec = sharding.logical_to_spec(spec.axes, spec.shape, mesh)
        want = tuple(d // sharding.shard_count(PartitionSpec(a), mesh) for d, a in zip(leaf.shape, pspec, strict=True))
        assert leaf.addressable_shards[0].data.shape == want
    if mesh_name != "data8":
        assert p["embed"].addressable_shards[0].data.size < p["embed"].size
    with jax.set_mesh(mesh):
        loss, logits, grads = jax.jit(partial(_step, cfg=cfg), out_shardings=(None, None, shardings))(p, t)
    np.testing.assert_allclose(logits, logits0, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(loss, loss0, rtol=1e-4)
    for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0), strict=True):
        np.testing.assert_allclose(g, g0, rtol=1e-4, atol=1e-6)


def test_expert_weights_split_over_expert_and_tensor_axes():
    mesh = sharding.make_mesh({"expert": 4, "fsdp": 2})
    spec = param_specs(V3)[MOE_LAYERS]["mlp"]["experts"]["gate"]  # [L, e, d, f]
    assert sharding.logical_to_spec(spec.axes, spec.shape, mesh) == PartitionSpec(None, "expert", "fsdp", None)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert sharding.logical_to_spec(spec.axes, spec.shape, mesh) == PartitionSpec(None, "tensor", "fsdp", None)
    whole_experts = PartitionSpec(None, ("expert", "tensor"), None, None)  # 8 experts over 8 devices
    mesh = sharding.make_mesh({"expert": 4, "tensor": 2})
    assert sharding.logical_to_spec(spec.axes, spec.shape, mesh) == whole_experts
    mesh = sharding.make_mesh({"expert": 2, "tensor": 4})
    assert sharding.logical_to_spec(spec.axes, spec.shape, mesh) == whole_experts
    odd = ParamSpec((6, 32, 16), ("experts", "embed", "expert_ffw"))  # 6 experts: tensor 4 does not divide them
    assert sharding.logical_to_spec(odd.axes, odd.shape, mesh) == PartitionSpec("expert", None, "tensor")
    batch = sharding.batch_sharding(sharding.make_mesh({"expert": 4, "fsdp": 2}), (8, 8)).spec
    assert batch == PartitionSpec(("fsdp", "expert"), None)


def _load_config(name):
    return importlib.import_module(f"r1jax.configs.{name}")


def test_v3_671b_shapes_on_abstract_256_device_mesh():
    cfg = _load_config("v3_671b").model()
    mesh = sharding.abstract_mesh({"fsdp": 16, "tensor": 4, "expert": 4})
    specs = param_specs(cfg, mtp=True)
    sharding.check_rules(specs, mesh)
    shardings = sharding.param_shardings(specs, mesh)
    abstract = jax.eval_shape(jax.jit(partial(init_params, cfg, mtp=True), out_shardings=shardings), jax.random.key(0))
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    total = sum(x.size for _, x in flat)
    assert 682e9 < total < 683e9  # 671.0 B + an 11.6 B MTP block (HF's 685 B also counts MTP copies of embed/head)
    per_device = 0
    for path, x in flat:
        named = sharding.spec_axes(x.sharding.spec)
        assert len(named) == len(set(named)), (jax.tree_util.keystr(path), x.sharding.spec)
        shard = x.sharding.shard_shape(x.shape)
        if x.ndim >= 2 and x.size >= sharding.LARGE_PARAM:
            assert np.prod(shard) * 16 <= x.size, (jax.tree_util.keystr(path), x.sharding.spec)
        per_device += np.prod(shard) * x.dtype.itemsize
    # experts are split 256 ways, attention/dense 64 ways (4x replicated over "expert"): close to the ideal
    assert per_device < 1.1 * total * 4 / 256


def test_rules_reject_misuse():
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.validate_rules({"embed": ("fsdp", "model")})
    with pytest.raises(ValueError, match="twice"):
        sharding.validate_rules({"embed": ("fsdp", "fsdp")})
    with pytest.raises(ValueError, match="tensor"):
        sharding.validate_rules({"batch": ("data", "tensor")})
    mesh = sharding.abstract_mesh({"fsdp": 4, "tensor": 2})
    with pytest.raises(ValueError, match="no rule"):
        sharding.logical_to_spec(("embed", "hidden"), (8, 8), mesh)
    with pytest.raises(ValueError, match="large but fully replicated"):
        sharding.check_rules({"w": ParamSpec((2048, 2048), (None, None))}, mesh)
    # two nouns asking for one mesh axis: the first keeps it, the second stays whole
    assert sharding.logical_to_spec(("embed", "q_lora"), (8, 8), mesh) == PartitionSpec("fsdp", None)
    # an axis that does not divide stays replicated
    assert sharding.logical_to_spec(("heads", "embed"), (3, 8), mesh) == PartitionSpec(None, "fsdp")


def test_constrain_is_identity_without_mesh():
    x = jnp.ones((4, 3, 8))
    assert sharding.current_mesh() is None
    assert sharding.constrain(x, ("batch", None, None)) is x
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    with jax.set_mesh(mesh):
        y = jax.jit(lambda a: sharding.constrain(a * 2, ("batch", None, None)))(x)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec("fsdp", None, None)), 3)


EP_CASES = {  # mesh, routing, slack -> the dispatch rounds the busiest expert shard needs (, tokens if not 64)
    "e4f2": ({"expert": 4, "fsdp": 2}, "uniform", 2.0, 1),
    "e4t2": ({"expert": 4, "tensor": 2}, "skewed", 1.25, 3),
    "e8": ({"expert": 8}, "skewed", 1.25, 3),
    "e2f2d2": ({"expert": 2, "fsdp": 2, "data": 2}, "skewed", 1.25, 2),
    "e4f2_rounds": ({"expert": 4, "fsdp": 2}, "uniform", 0.3, 4),
    "e2t2f2_rounds": ({"expert": 2, "tensor": 2, "fsdp": 2}, "uniform", 0.3, 4),
    "e4f2_one_expert": ({"expert": 4, "fsdp": 2}, "one_expert", 0.5, 4),
    "e8_one_expert": ({"expert": 8}, "one_expert", 0.25, 11),
    "t8": ({"tensor": 8}, "uniform", 1.25, 1),  # experts over tensor alone: every device takes 1/8 of the tokens
    "e4t2_padded": ({"expert": 4, "tensor": 2}, "skewed", 1.25, 2, 60),  # 15 tokens per expert shard, split 8 + 7
}


def _routing(kind, key, n_tok, e, k):
    logits = jax.random.normal(key, (n_tok, e))
    if kind == "skewed":  # most tokens pick experts 0..2 (one or two shards), so chunks fill unevenly
        logits += jnp.where(jnp.arange(e) < 3, 3.0, 0.0)
    elif kind == "one_expert":  # (nearly) every token picks expert 0
        logits += jnp.where(jnp.arange(e) == 0, 8.0, 0.0)
    w, idx = jax.lax.top_k(jax.nn.softmax(logits), k)
    return w, idx.astype(jnp.int32)


@pytest.mark.parametrize("case", list(EP_CASES))
def test_expert_parallel_dispatch_equals_dropless_reference(case):
    from r1jax import expert_parallel, moe

    mesh_shape, routing, slack, rounds, *n_tok = EP_CASES[case]
    n_tok, d, f, e, k = (n_tok or [64])[0], 16, 8, 8, 3
    keys = jax.random.split(jax.random.key(3), 5)
    x = jax.random.normal(keys[0], (n_tok, d))
    w, idx = _routing(routing, keys[1], n_tok, e, k)
    p = {
        "gate": jax.random.normal(keys[2], (e, d, f)) * 0.3,
        "up": jax.random.normal(keys[3], (e, d, f)) * 0.3,
        "down": jax.random.normal(keys[4], (e, f, d)) * 0.3,
    }

    def loss(fn, x, w, p):
        y = fn(x, w, idx, p)
        return jnp.sum(jnp.sin(y)), y

    grad = jax.jit(jax.value_and_grad(partial(loss, moe.routed_experts), argnums=(0, 1, 2), has_aux=True))
    (_, y0), g0 = grad(x, w, p)
    mesh = sharding.make_mesh(mesh_shape)
    ep = jax.checkpoint(partial(expert_parallel.routed_experts, slack=slack))  # the model remats each layer
    with jax.set_mesh(mesh):
        assert expert_parallel.enabled(e)
        ep_grad = jax.jit(jax.value_and_grad(partial(loss, ep), argnums=(0, 1, 2), has_aux=True))
        jaxpr = str(ep_grad.trace(x, w, p).jaxpr)
        assert "all_to_all" in jaxpr and "while" in jaxpr
        (_, y), g = ep_grad(x, w, p)
    np.testing.assert_allclose(y, y0, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # the rounds every device ran: one when slack covers the busiest destination, several when it does not
    assert _rounds_from_routing(idx, e, k, expert_parallel.layout(n_tok, e, d, f, mesh), mesh, slack) == rounds


def _rounds_from_routing(idx, e, k, lay, mesh, slack) -> int:
    """The rounds the dispatch needs, from the routing alone: every device takes its slice of its token shard; an
    expert shard receives from the devices of its group (those sharing every mesh coordinate outside the group)."""
    from r1jax import expert_parallel

    sizes, n_batch, e_local = dict(mesh.shape), sharding.shard_count(lay.tok_spec, mesh), e // lay.n_shards
    pad = ((0, 0), (0, lay.tokens * lay.split_size - idx.shape[0] // n_batch), (0, 0))
    chunks = np.pad(np.asarray(idx).reshape(n_batch, -1, k), pad, constant_values=e).reshape(-1, lay.tokens * k)

    def linear(coords, axes):
        out = 0
        for a in axes:
            out = out * sizes[a] + coords[a]
        return out

    received = {}
    for where in itertools.product(*(range(sizes[a]) for a in mesh.axis_names)):
        c = dict(zip(mesh.axis_names, where, strict=True))
        mine = chunks[linear(c, sharding.spec_axes(lay.tok_spec)) * lay.split_size + linear(c, lay.split)]
        group = tuple(c[a] for a in mesh.axis_names if a not in lay.group)
        counts = np.bincount(mine // e_local, minlength=lay.n_shards + 1)[: lay.n_shards]
        received[group] = received.get(group, 0) + counts
    cap = expert_parallel.round_rows(lay.tokens, k, lay.n_shards, e_local, slack)
    return max(int(expert_parallel.dispatch_rounds(r, cap)) for r in received.values())


def test_dispatch_capacity_and_rounds():
    from r1jax import expert_parallel

    # the most one shard can receive: every token of its group's devices sends it min(k, experts per shard) rows
    assert expert_parallel.dispatch_capacity(4, 3, 1, 2) == 8 and expert_parallel.dispatch_capacity(4, 3, 8, 2) == 24
    # V3 on v5p-2048: 512 tokens x 8 experts per device, groups of 128 shards: 4096 rows per shard, 25% slack
    assert expert_parallel.round_rows(512, 8, 128, 2, 1.25) == 5120
    assert expert_parallel.round_rows(4, 3, 8, 1, 0.01) == 1  # at least one row
    assert expert_parallel.round_rows(4, 3, 2, 4, 10.0) == 24  # at most the worst case: one round always suffices
    assert int(expert_parallel.dispatch_rounds(jnp.array([0, 5, 10, 11]), 5)) == 3
    assert int(expert_parallel.dispatch_rounds(jnp.array([0, 0]), 5)) == 0


def test_ragged_exchange_on_cpu_follows_ragged_all_to_all():
    """The CPU emulation of ``jax.lax.ragged_all_to_all`` reproduces the example of its documentation (two devices:
    each sends slices of its operand; ``output_offsets`` say where they land on the receiver)."""
    from r1jax import expert_parallel

    args = {  # per device: operand, output, input_offsets, send_sizes, output_offsets, recv_sizes
        0: ([1, 2, 2], [0, 0, 0, 0], [0, 1], [1, 2], [0, 0], [1, 1]),
        1: ([3, 4, 0], [0, 0, 0, 0], [0, 1], [1, 1], [1, 2], [2, 1]),
    }
    stacked = [jnp.asarray([args[0][i], args[1][i]], jnp.int32).reshape(-1) for i in range(6)]
    mesh = sharding.make_mesh({"expert": 2}, devices=jax.devices()[:2])
    fn = jax.shard_map(
        partial(expert_parallel.ragged_exchange, axis=("expert",)),
        mesh=mesh,
        in_specs=(PartitionSpec("expert"),) * 6,
        out_specs=PartitionSpec("expert"),
    )
    result = np.asarray(jax.jit(fn)(*stacked)).reshape(2, 4)
    np.testing.assert_array_equal(result, [[1, 3, 0, 0], [2, 2, 4, 0]])


def test_sum_over_rounds_value_and_gradient_match_a_python_loop():
    """The loop of dispatch rounds and its backward, as ``expert_parallel``'s custom VJP runs them (the forward's sum,
    then ``sum_over_rounds_vjp`` with its cotangent), against ``jax.value_and_grad`` of a Python loop."""
    from r1jax import expert_parallel

    def round_fn(r, consts, a, b):  # round r touches row consts[r] only
        row = consts[r]
        return jnp.zeros_like(a).at[row].set(jnp.sin(a[row] * b) * (r + 1))

    a = jax.random.normal(jax.random.key(0), (5, 3))
    b = jnp.array(0.7)
    rows = jnp.array([4, 0, 2, 1, 3], jnp.int32)

    def rounds(a, b, n):
        total = expert_parallel.sum_over_rounds(round_fn, n, rows, (a, b))
        grads = expert_parallel.sum_over_rounds_vjp(round_fn, n, rows, (a, b), 2 * total)  # d sum(total**2)
        return jnp.sum(total**2), grads

    def loop(a, b, n):
        return jnp.sum(sum((round_fn(r, rows, a, b) for r in range(n)), jnp.zeros_like(a)) ** 2)

    for n in (0, 1, 3):
        v, g = jax.jit(rounds)(a, b, jnp.int32(n))
        v0, g0 = jax.value_and_grad(loop, argnums=(0, 1))(a, b, n)
        np.testing.assert_allclose(v, v0, rtol=1e-6)
        for x, y in zip(g, g0, strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_remat_keeps_the_expert_rows_instead_of_rerunning_the_rounds():
    """Under the model's remat policies the layer's recompute does not run the dispatch rounds again: the rows are
    kept (``expert_parallel.EXPERT_ROWS``), so the program (the layer's output feeds the next layer, so the forward
    runs too) has fewer all-to-alls than plain remat, with the same value and gradients."""
    from r1jax import expert_parallel
    from r1jax.model import REMAT_POLICIES

    n_tok, d, f, e, k = 64, 16, 8, 8, 3
    keys = jax.random.split(jax.random.key(3), 5)
    x = jax.random.normal(keys[0], (n_tok, d))
    w, idx = _routing("uniform", keys[1], n_tok, e, k)
    p = {
        n: jax.random.normal(kk, s) * 0.3
        for n, kk, s in zip(("gate", "up", "down"), keys[2:], [(e, d, f)] * 2 + [(e, f, d)], strict=True)
    }

    c = jax.random.normal(keys[0], (n_tok, d))  # a linear read-out, as the residual add is in the model

    def grad_of(policy):
        ep = jax.checkpoint(lambda x, w, p: expert_parallel.routed_experts(x, w, idx, p) * c, policy=policy)
        return jax.jit(jax.value_and_grad(lambda x, w, p: jnp.sum(ep(x, w, p)), argnums=(0, 1, 2)))

    with jax.set_mesh(sharding.make_mesh({"expert": 4, "fsdp": 2})):
        runs = {}
        for name, policy in (("plain", None), ("kept", REMAT_POLICIES["full"])):
            fn = grad_of(policy)
            hlo = fn.lower(x, w, p).compile().as_text()
            runs[name] = (fn(x, w, p), hlo.count("all-to-all("))
    (g_plain, a2a_plain), (g_kept, a2a_kept) = runs["plain"], runs["kept"]
    assert a2a_kept < a2a_plain, (a2a_kept, a2a_plain)
    for a, b in zip(jax.tree.leaves(g_kept), jax.tree.leaves(g_plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
