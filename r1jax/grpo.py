"""The GRPO step: the jitted policy update and the trainer that runs sample -> score -> select -> log-probs ->
update (the loss and the log-probs are ``r1jax.loss``; the optimiser, ``r1jax.optim``).

``update_minibatch`` is one jitted optimiser step on a mini-batch of completions (gradient accumulation, the MoE
router-bias update); ``GRPOTrainer`` holds the config, the reward function and the mesh and runs whole steps
(``init_state`` / ``grpo_step``); ``text_reward`` is the standard reward function over decoded completions.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from r1jax import lora, rollout
from r1jax.config import ModelConfig, TrainConfig
from r1jax.errors import ConfigError
from r1jax.loss import (
    group_advantages,
    group_rows,
    grpo_loss,
    masked_mean,
    overlong_filter,
    reward_metrics,
    sequence_logprobs,
    trained_groups,
    zero_variance_groups,
)
from r1jax.model import MOE_LAYERS, Params
from r1jax.optim import (
    accumulate_and_apply,
    init_opt_state,
    lr_schedule,
    make_optimizer,
    opt_shardings,
    reduce_metrics,
    split_micro,
    steps_taken,
    stop_router_bias,
)
from r1jax.sharding import batch_sharding, commit, normalize_mesh, put, split_mesh, to_host
from r1jax.tool_rollout import sample_with_tools, tool_metrics
from r1jax.tools import ToolEnv

Array = jax.Array

# One GRPO step is a host loop over jitted phases:
#   sample   (r1jax.rollout's slot engine: one prefill per prompt, G decodes from its cache; with partial rollouts
#             the engine persists between steps and a step trains the oldest prompts_per_step complete groups)
#   score    (host: the reward function, e.g. ``text_reward`` -> r1jax.rewards.score)
#   select   (host: DAPO dynamic sampling picks informative groups; overlong filtering zeroes truncated rows)
#   logprobs (``sequence_logprobs`` under pi_old and pi_ref; pi_old is skipped when mu = 1 and there is one
#             mini-batch: it then equals the current policy's log-probs, used under stop_gradient)
#   update   (``update_minibatch``, mu x num_minibatches times: gradient accumulation over micro-batches with the
#             whole mini-batch's token / sequence counts as normalisers, global-norm clip, AdamW, then the
#             aux-loss-free router-bias update from the mini-batch's global expert loads)
# and every ``ref_update_every`` steps the reference model becomes a copy of the policy.
#
# Sharding: with a mesh, parameters are placed by ``r1jax.sharding.param_shardings`` and every per-row array is
# sharded over the mesh's batch axes (data parallel); gradients are reduced by XLA. Results equal the unsharded run.
#
# The expert loads of the bias update leave prompt padding out and count every completion slot, a row's padding
# after its end included. With ``grpo.routing_replay`` the teacher-forced passes route every token with the
# experts the sampler chose (``TrainBatch.routes``); the loads of the bias update are then those experts'.

RewardFn = Callable[[rollout.Rollout, Sequence[Mapping[str, Any]]], tuple[np.ndarray, dict[str, float]]]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainBatch:
    """What the policy update reads, one row per completion (all sharded along rows)."""

    prompt_tokens: Array  # int32[n, P]
    prompt_start: Array  # int32[n]
    tokens: Array  # int32[n, T]
    mask: Array  # float32[n, T] after overlong / dynamic-sampling filtering
    advantages: Array  # float32[n]
    sampler_logp: Array  # float32[n, T]
    old_logp: Array | None  # float32[n, T]; None: the current policy's (mu = 1, one mini-batch)
    ref_logp: Array | None  # float32[n, T]; None when kl_coef = 0
    routes: Array | None = None  # [n, L_moe, P + T, k]: the sampler's experts (routing replay); None: off


def _replayed(routes: Array | None) -> Array | None:
    """A batch's recorded routes as ``sequence_logprobs`` takes them: int32[L_moe, n, P + T, k]."""
    return None if routes is None else jnp.swapaxes(routes, 0, 1).astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GRPOState:
    step: Array  # int32[]: GRPO steps done
    params: Params
    ref_params: Params | None  # the reference's trainable part (``lora.reference``); None when kl_coef = 0
    opt_state: Any


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "model_cfg", "micro_batch", "mesh", "prompt_group"),
    donate_argnames=("params", "opt_state"),
)
def update_minibatch(
    params: Params,
    opt_state: Any,
    batch: TrainBatch,
    *,
    cfg: TrainConfig,
    model_cfg: ModelConfig,
    micro_batch: int,
    mesh: Mesh | None = None,
    prompt_group: int = 1,
) -> tuple[Params, Any, dict[str, Array]]:
    """One optimiser step on a mini-batch (``r1jax.optim.accumulate_and_apply``): micro-batches of ``micro_batch``
    rows, each micro-batch loss normalised by the whole mini-batch's token / sequence counts (so their sum IS the
    mini-batch loss), clip, AdamW, then the router-bias update from the mini-batch's expert loads.
    ``prompt_group`` > 1: rows come in runs of that many sharing a prompt (``sequence_logprobs``)."""
    g = cfg.grpo
    k = batch.tokens.shape[0] // micro_batch
    tau = rollout.logprob_temperature(cfg.sampling.temperature)
    mask = batch.mask.astype(jnp.float32)
    num_tokens = jnp.sum(mask)
    num_seqs = jnp.sum((jnp.sum(mask, axis=-1) > 0).astype(jnp.float32))
    micro = jax.tree.map(lambda x: split_micro(x, k), batch)
    # a micro-batch takes every k-th row, so a run of G rows with one prompt leaves G / k of them in each
    group = prompt_group // k if prompt_group % k == 0 else 1
    train, frozen = lora.partition(params)  # with adapters only they train; otherwise every parameter

    def loss_fn(t, mb: TrainBatch):
        mb = jax.tree.map(lambda x: rollout.constrain_batch(x, mesh), mb)
        p = stop_router_bias(lora.combine(t, frozen))
        logp, aux = sequence_logprobs(
            p, mb.prompt_tokens, mb.prompt_start, mb.tokens, model_cfg, temperature=tau, entropy=True,
            prompt_group=group, routes=_replayed(mb.routes),
        )  # fmt: skip
        old = jax.lax.stop_gradient(logp) if mb.old_logp is None else mb.old_logp
        loss, metrics = grpo_loss(
            logp, old, mb.ref_logp, mb.advantages, mb.mask, g, sampler_logp=mb.sampler_logp, num_tokens=num_tokens,
            num_seqs=num_seqs,
        )  # fmt: skip
        metrics["entropy"] = jax.lax.stop_gradient(masked_mean(aux["entropy"], mb.mask))
        return loss, (metrics, aux["expert_load"])

    tx = make_optimizer(cfg.optim)
    params, opt_state, per_micro, stats = accumulate_and_apply(
        loss_fn, train, frozen, opt_state, micro, optimizer=tx, router_bias_gamma=cfg.optim.router_bias_gamma
    )
    tok = per_micro["tokens"]
    metrics = reduce_metrics(per_micro, tok / jnp.maximum(jnp.sum(tok), 1.0), extensive=("loss", "tokens"))
    metrics["grad_norm"] = stats["grad_norm"]
    metrics["skipped"] = 1.0 - stats["finite"].astype(jnp.float32)
    metrics["lr"] = lr_schedule(cfg.optim)(steps_taken(opt_state) - 1)
    if stats["load"] is not None:
        load = stats["load"]
        metrics["moe/load_max_over_mean"] = jnp.mean(jnp.max(load, -1) / jnp.maximum(jnp.mean(load, -1), 1e-9))
        metrics["moe/bias_abs_mean"] = jnp.mean(jnp.abs(params[MOE_LAYERS]["mlp"]["router_bias"]))
    if mesh is not None:
        opt_state = jax.lax.with_sharding_constraint(opt_state, opt_shardings(opt_state, params, model_cfg, mesh))
        params = jax.lax.with_sharding_constraint(params, lora.shardings(params, model_cfg, mesh))
    return params, opt_state, metrics


_merged = jax.jit(lora.merge)


def text_reward(cfg: TrainConfig, decode: Callable[[list[int]], str], stop_ids: Sequence[int]) -> RewardFn:
    """The standard reward: decode each completion (stop token dropped, stop string kept or not per the sampling
    config) and score it with ``r1jax.rewards.score`` under ``cfg.rewards``; ``meta["num_tokens"]`` is filled in
    for the overlong reward."""
    from r1jax import rewards

    def fn(ro: rollout.Rollout, metadata: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, dict[str, float]]:
        texts = rollout.completion_texts(
            ro,
            decode,
            stop_ids=stop_ids,
            stop_strings=cfg.sampling.stop_strings,
            include_stop_str=cfg.sampling.include_stop_str,
        )
        metas = [{**m, "num_tokens": int(n)} for m, n in zip(metadata, np.asarray(ro.lengths), strict=True)]
        return rewards.score(texts, metas, cfg.rewards)

    return fn


class _SampleAhead:
    """Off-policy overlap: rollouts of later steps sampled on a background thread, with the weights of the step that
    launched them, while the current step scores, computes log-probs and updates. After each update the weights are
    transferred to the sampler (resharded onto the sampler mesh, or copied on one device); a rollout launched at
    step s and trained at step t has staleness t - s <= ``max_off_policy_steps`` (launches stop at that horizon).
    Its tokens keep the log-probs of the weights that drew them: the TIS weight min(pi_old / pi_sampler, cap)
    corrects for them. Rollouts in flight are not part of a checkpoint: a resumed run samples them again."""

    def __init__(self, trainer: GRPOTrainer):
        self.trainer = trainer
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="r1jax-sampler")
        self.futures: dict[int, tuple[concurrent.futures.Future, int]] = {}
        self.weights: Params | None = None
        self.version = -1  # the GRPO step whose weights ``weights`` are

    def refresh(self, state: GRPOState) -> None:
        """The weight transfer: the policy after this step's update, placed for the sampler."""
        t = self.trainer
        view = t._inference_view(state.params)
        mesh = t.sampler_mesh
        if mesh is None or mesh is t.mesh:
            self.weights = jax.tree.map(jnp.copy, view)
        else:
            self.weights = jax.device_put(view, lora.shardings(view, t.model_cfg, mesh))
        jax.block_until_ready(self.weights)
        self.version = int(state.step)

    def launch(self, step: int, prompts, key: Array) -> None:
        if step in self.futures or step - self.version > self.trainer.cfg.grpo.max_off_policy_steps:
            return
        fut = self.pool.submit(self.trainer._sample, self.weights, [list(p) for p in prompts], key)
        self.futures[step] = (fut, self.version)

    def take(self, state: GRPOState, step: int, prompts, key: Array) -> tuple[rollout.Rollout, dict[str, float]]:
        """This step's rollout: launched ahead if it was, else sampled now with this step's weights."""
        if self.weights is None:
            self.refresh(state)
        if step not in self.futures:
            self.launch(step, prompts, key)
        fut, version = self.futures.pop(step)
        return fut.result(), {"offpolicy/staleness": float(step - version)}


@dataclasses.dataclass
class _Group:
    sids: list[int]
    prompt: list[int]
    meta: Mapping[str, Any]
    step: int  # the GRPO step that queued it


class _PartialRollouts:
    """The state partial rollouts keep between GRPO steps: a ``SlotEngine`` whose unfinished rows carry over, cache
    and all, and the queued groups in submission order. Each token keeps the sampler log-prob of the policy that
    drew it, so the TIS / ratio terms of a row drawn over several steps stay exact. In-flight rows are not part of
    a checkpoint: a resumed run queues its groups afresh."""

    def __init__(self, engine: rollout.SlotEngine, group_size: int, bucket: int):
        self.engine, self.G, self.bucket = engine, group_size, bucket
        self.groups: list[_Group] = []

    def step(self, params, prompts, metadata, key, step, cfg: TrainConfig, model_cfg: ModelConfig, decode):
        """Queue this step's groups, decode ``sampling.step_budget`` steps, and return the oldest complete groups
        (at most ``prompts_per_step``), their metadata, metrics, and how many groups are real: the rollout is filled
        up to ``prompts_per_step`` groups with copies of the first, which the trainer masks out. Decoding goes on
        past the budget while no group is complete, or while more than two steps' groups wait unfinished (the
        backlog, and so the staleness, stays bounded)."""
        eng, want = self.engine, cfg.grpo.prompts_per_step
        for i, (p, m) in enumerate(zip(prompts, metadata, strict=True)):
            self.groups.append(_Group(eng.submit(p, self.G, jax.random.fold_in(key, i)), list(p), m, step))
        steps = 0
        while True:
            steps += eng.run(params, max_steps=cfg.sampling.step_budget)
            ready = [g for g in self.groups if all(s in eng.finished for s in g.sids)]
            if (ready and len(self.groups) - len(ready) <= 2 * want) or not eng.busy:
                break
        take = ready[:want]
        self.groups = [g for g in self.groups if g not in take]
        rows = [eng.finished.pop(s) for g in take for s in g.sids]
        filled = take + [take[0]] * (want - len(take))
        rows += rows[: self.G] * (want - len(take))
        ro = rollout.assemble(rows, [g.prompt for g in filled], self.G, cfg.sampling.max_new_tokens, eng.pad,
                              model_cfg, self.bucket, eng.prompt_len)  # fmt: skip
        if decode is not None and cfg.sampling.stop_strings:
            ro = rollout.apply_stop_strings(ro, decode, cfg.sampling.stop_strings)
        age = np.asarray([step - g.step for g in take], np.float32)
        info = {
            "rollout/staleness_mean": float(age.mean()),
            "rollout/staleness_max": float(age.max()),
            "rollout/complete_groups": float(len(take)),
            "rollout/carried_groups": float(len(self.groups)),
            "rollout/decode_steps": float(steps),
        }
        return ro, [g.meta for g in filled], info, len(take)


def _take_rows(x, rows: np.ndarray):
    return None if x is None else np.asarray(x)[rows]


class GRPOTrainer:
    """The GRPO step around a model config, a reward function and (optionally) a mesh.

    ``init_state(params)`` -> ``GRPOState``; ``grpo_step(state, prompts, metadata, key)`` -> (state, metrics), with
    ``prompts`` a list of token lists (``grpo.prompts_per_step`` of them, or more with dynamic sampling: the step
    trains on the first ``prompts_per_step`` groups whose rewards differ and fills up with masked-out ones) and
    ``metadata`` one dict per prompt (passed to the reward function, repeated per sample).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model_cfg: ModelConfig,
        reward_fn: RewardFn,
        *,
        mesh: Mesh | None = None,
        stop_ids: Sequence[int] | None = None,
        encode: Callable[[str], list[int]] | None = None,
        decode: Callable[[list[int]], str] | None = None,
        prompt_bucket: int = 32,
        tools: ToolEnv | None = None,
        budgets: Callable[[Sequence[Sequence[int]]], Sequence[int]] | None = None,
    ):
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.reward_fn = reward_fn
        self.mesh = normalize_mesh(mesh) if mesh is not None else None
        self.sampler_mesh = self.mesh
        if cfg.grpo.routing_replay and not model_cfg.n_moe_layers:
            raise ConfigError("grpo.routing_replay replays MoE routes: this model has no MoE layers")
        if cfg.grpo.max_off_policy_steps and self.mesh is not None and self.mesh.size > 1:
            self.mesh, self.sampler_mesh = split_mesh(self.mesh)
        self.stop_ids = list(model_cfg.eos_token_ids) if stop_ids is None else list(stop_ids)
        self.encode, self.decode = encode, decode
        self.prompt_bucket = prompt_bucket
        self.budgets = budgets  # per-row max_new_tokens of a step's rollout (rows in group order); None: the config's
        self.optimizer = make_optimizer(cfg.optim)
        if tools is None and cfg.tools.enabled:
            from r1jax.tools import build_tools

            tools = build_tools(cfg.tools, forbidden=cfg.sampling.stop_strings)
        self.tools = tools
        self._partial: _PartialRollouts | None = None
        self._ahead = _SampleAhead(self) if cfg.grpo.max_off_policy_steps else None

    # placement -------------------------------------------------------------------------------------------------
    def _place_params(self, params: Params) -> Params:
        if self.mesh is None:
            return commit(params)
        return jax.device_put(params, lora.shardings(params, self.model_cfg, self.mesh))

    def _place_rows(self, x):
        """Host rows (the same on every process) -> split over the mesh's data axes."""
        if x is None:
            return None
        return jnp.asarray(x) if self.mesh is None else put(np.asarray(x), batch_sharding(self.mesh, x.shape))

    def init_state(self, params: Params) -> GRPOState:
        """Placed parameters, optimiser state for their trainable part, and the reference: a copy of that part (with
        adapters, the adapters alone: the reference shares the policy's frozen base)."""
        params = self._place_params(params)
        ref = jax.tree.map(jnp.copy, lora.partition(params)[0]) if self.cfg.grpo.kl_coef > 0 else None
        opt_state = init_opt_state(self.optimizer, params, self.model_cfg, self.mesh)
        return GRPOState(step=jnp.zeros((), jnp.int32), params=params, ref_params=ref, opt_state=opt_state)

    # phases ----------------------------------------------------------------------------------------------------
    def _select(self, ro: rollout.Rollout, rewards: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """Rows to train on and their mask (dynamic sampling + overlong filtering), host side."""
        g, G = self.cfg.grpo, self.cfg.grpo.group_size
        n_groups = len(rewards) // G
        if g.dynamic_sampling:
            order, dropped = trained_groups(rewards, G, g.prompts_per_step)
        else:
            order, dropped = np.arange(n_groups), np.zeros(n_groups, bool)
        rows = group_rows(order, G)
        mask = np.asarray(ro.mask, np.float32)[rows]
        if g.overlong_filter:
            ended, lengths = np.asarray(ro.ended)[rows], np.asarray(ro.lengths)[rows]
            mask = np.asarray(overlong_filter(mask, ended, g.max_completion_len, lengths))
        mask = mask * ~np.repeat(dropped, G)[:, None]
        info = {
            "groups/zero_variance_frac": float(np.asarray(zero_variance_groups(rewards, G)).mean()),
            "groups/sampled": float(n_groups),
            "groups/trained": float((~dropped).sum()),
        }
        return rows, mask, info

    def grpo_step(
        self,
        state: GRPOState,
        prompts: Sequence[Sequence[int]],
        metadata: Sequence[Mapping[str, Any]],
        key: Array,
        ahead: Sequence[tuple[Sequence[Sequence[int]], Sequence[Mapping[str, Any]], Array]] = (),
    ) -> tuple[GRPOState, dict[str, float]]:
        """Sample, score, select, compute log-probs, update (see the section comment); returns the new state and
        host-side float metrics. With a mesh, runs under ``jax.set_mesh`` (the model's activation constraints).

        ``ahead``: with ``grpo.max_off_policy_steps`` = k, the (prompts, metadata, key) of the next steps (at most k
        are used): their sampling starts now, in the background, with this step's weights, while this step updates;
        a later step whose rollout is ready trains on it (staleness = steps between sampling and training)."""
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            return self._step(state, prompts, metadata, key, ahead)

    def _inference_view(self, params: Params) -> Params:
        """The weights the sampler and the teacher-forced log-prob passes read: with ``lora.merged_sampling`` the
        adapters merged in (a transient copy, gone when the pass ends), otherwise ``params`` as they are."""
        return _merged(params) if self.cfg.lora.enabled and self.cfg.lora.merged_sampling else params

    def _sample_partial(self, params: Params, prompts, metadata, key: Array, step: int):
        """Partial rollouts (``_PartialRollouts.step``): the engine, its carried rows and queued groups persist
        between steps."""
        if self._partial is None:
            s = self.cfg.sampling
            width = rollout.prompt_width(self.cfg.data.max_prompt_tokens, self.prompt_bucket, s.prompt_chunk)
            n = self.cfg.grpo.samples_per_step
            engine = rollout.SlotEngine(
                self.model_cfg, s, slots=s.slots or n, prompt_len=width, stop_ids=self.stop_ids,
                stop_seqs=rollout.stop_token_seqs(s.stop_strings, self.encode), prompt_chunk=s.prompt_chunk or width,
                prefill_batch=-(-(s.slots or n) // self.cfg.grpo.group_size), mesh=self.mesh,
                record_routes=self.cfg.grpo.routing_replay,
            )  # fmt: skip
            self._partial = _PartialRollouts(engine, self.cfg.grpo.group_size, self.prompt_bucket)
        return self._partial.step(params, prompts, metadata, key, step, self.cfg, self.model_cfg, self.decode)

    def _sample(self, params: Params, prompts, key: Array) -> rollout.Rollout:
        """G samples per prompt: single-turn, or multi-turn trajectories with ``self.tools`` (their result tokens
        are context with mask 0, so they stay out of the loss, the ratio and the KL; advantages are per trajectory).
        On the sampler mesh (the trainer's own, or its sampler half with off-policy overlap)."""
        kw = dict(cfg=self.model_cfg, sampling=self.cfg.sampling, group_size=self.cfg.grpo.group_size,
                  stop_ids=self.stop_ids, encode=self.encode, decode=self.decode, mesh=self.sampler_mesh,
                  bucket=self.prompt_bucket)  # fmt: skip
        if self.tools is None:
            budgets = None if self.budgets is None else self.budgets(prompts)
            return rollout.sample(params, prompts, key, record_routes=self.cfg.grpo.routing_replay, budgets=budgets,
                                  **kw)  # fmt: skip
        return sample_with_tools(params, prompts, key, env=self.tools, **kw)

    def _check_prompts(self, prompts, metadata) -> None:
        g = self.cfg.grpo
        if len(prompts) != len(metadata):
            raise ValueError(f"{len(prompts)} prompts but {len(metadata)} metadata dicts")
        if len(prompts) != g.prompts_per_step and not (g.dynamic_sampling and len(prompts) > g.prompts_per_step):
            raise ValueError(
                f"expected {g.prompts_per_step} prompts (more only with dynamic sampling), got {len(prompts)}"
            )

    def _score(self, ro: rollout.Rollout, metadata) -> tuple[np.ndarray, dict[str, float]]:
        rewards, info = self.reward_fn(ro, [m for m in metadata for _ in range(self.cfg.grpo.group_size)])
        return np.asarray(rewards, np.float32), info

    def _batch(self, ro: rollout.Rollout, rows: np.ndarray, mask: np.ndarray, rewards: np.ndarray) -> TrainBatch:
        """The selected rows, placed over the mesh, with their advantages (log-probs come next)."""
        place = self._place_rows
        return TrainBatch(
            prompt_tokens=place(_take_rows(ro.prompt_tokens, rows)),
            prompt_start=place(_take_rows(ro.prompt_start, rows)),
            tokens=place(_take_rows(ro.tokens, rows)),
            mask=place(mask),
            advantages=place(np.asarray(group_advantages(rewards, self.cfg.grpo))),
            sampler_logp=place(_take_rows(ro.logp, rows)),
            old_logp=None,
            ref_logp=None,
            routes=place(_take_rows(ro.routes, rows)),
        )

    @property
    def _prompt_group(self) -> int:
        return self.cfg.grpo.group_size if self.cfg.grpo.shared_prompt else 1  # selected rows keep whole groups

    def _logprobs(self, state: GRPOState, batch: TrainBatch) -> TrainBatch:
        """pi_old's log-probs (only when they can differ from the policy's: mu > 1 or several mini-batches) and
        pi_ref's (when there is a KL term), from the inference view of the weights."""
        g = self.cfg.grpo
        tau = rollout.logprob_temperature(self.cfg.sampling.temperature)
        lp = functools.partial(sequence_logprobs, cfg=self.model_cfg, temperature=tau, prompt_group=self._prompt_group,
                               routes=_replayed(batch.routes))  # fmt: skip
        args = (batch.prompt_tokens, batch.prompt_start, batch.tokens)
        view = self._inference_view
        if g.num_iterations > 1 or g.num_minibatches > 1:
            batch = dataclasses.replace(batch, old_logp=lp(view(state.params), *args)[0])
        if g.kl_coef > 0:
            ref = view(lora.reference(state.params, state.ref_params))
            batch = dataclasses.replace(batch, ref_logp=lp(ref, *args)[0])
            del ref
        jax.block_until_ready((batch.old_logp, batch.ref_logp))
        return batch

    def _update(self, state: GRPOState, batch: TrainBatch, key: Array) -> tuple[Params, Any, list[dict]]:
        """mu passes over the batch, each in ``num_minibatches`` shuffled mini-batches: one optimiser step each."""
        cfg, g = self.cfg, self.cfg.grpo
        params, opt_state = state.params, state.opt_state
        n, mb = batch.tokens.shape[0], g.minibatch_size
        step_metrics = []
        for it in range(g.num_iterations):
            if g.num_minibatches > 1:
                perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, it), n))
            for j in range(g.num_minibatches):
                minibatch = batch
                if g.num_minibatches > 1:
                    idx = perm[j * mb : (j + 1) * mb]
                    minibatch = jax.tree.map(lambda x, idx=idx: self._place_rows(to_host(x)[idx]), batch)
                params, opt_state, m = update_minibatch(
                    params, opt_state, minibatch, cfg=cfg, model_cfg=self.model_cfg,
                    micro_batch=min(cfg.micro_batch, mb), mesh=self.mesh,
                    prompt_group=self._prompt_group if g.num_minibatches == 1 else 1,  # shuffling splits groups
                )  # fmt: skip
                step_metrics.append(m)
        return params, opt_state, jax.device_get(step_metrics)

    def _advance(self, state: GRPOState, params: Params, opt_state: Any) -> GRPOState:
        """The next state; every ``ref_update_every`` steps the reference becomes a copy of the policy's trainable
        part. The old reference goes before the new one is made: two model copies on device at the refresh, not
        three (the step consumes its input state anyway: params and optimiser state were donated)."""
        step, g = int(state.step) + 1, self.cfg.grpo
        ref = state.ref_params
        if ref is not None and g.ref_update_every and step % g.ref_update_every == 0:
            jax.tree.map(lambda x: x.delete(), ref)
            ref = jax.tree.map(jnp.copy, lora.partition(params)[0])
        return GRPOState(step=jnp.asarray(step, jnp.int32), params=params, ref_params=ref, opt_state=opt_state)

    def _step(self, state, prompts, metadata, key, ahead=()):
        self._check_prompts(prompts, metadata)
        k_sample, k_shuffle = jax.random.split(key)
        t0 = time.perf_counter()
        carry_info: dict[str, float] = {}
        real, step = self.cfg.grpo.prompts_per_step, int(state.step)
        if self.cfg.sampling.step_budget:
            ro, metadata, carry_info, real = self._sample_partial(
                self._inference_view(state.params), prompts, metadata, k_sample, step
            )
        elif self._ahead is not None:
            ro, carry_info = self._ahead.take(state, step, prompts, k_sample)
            for j, (p, _, k) in enumerate(ahead[: self.cfg.grpo.max_off_policy_steps]):
                self._ahead.launch(step + 1 + j, p, jax.random.split(k)[0])
        else:
            ro = self._sample(self._inference_view(state.params), prompts, k_sample)
        t1 = time.perf_counter()
        rewards, reward_info = self._score(ro, metadata)
        t2 = time.perf_counter()
        rows, mask, select_info = self._select(ro, rewards)
        if real < self.cfg.grpo.prompts_per_step:  # partial rollouts filled the batch up with masked copies
            mask = np.where(np.arange(len(mask))[:, None] < real * self.cfg.grpo.group_size, mask, 0.0)
            select_info["groups/trained"] = float(real)
        batch = self._logprobs(state, self._batch(ro, rows, mask, rewards[rows]))
        t3 = time.perf_counter()
        params, opt_state, step_metrics = self._update(state, batch, k_shuffle)
        t4 = time.perf_counter()
        new_state = self._advance(state, params, opt_state)
        if self._ahead is not None:
            self._ahead.refresh(new_state)
            carry_info["perf/weight_transfer_s"] = time.perf_counter() - t4

        metrics = {"step": float(new_state.step), **self._update_metrics(step_metrics)}
        metrics.update({k: float(v) for k, v in reward_metrics(rewards, self.cfg.grpo.group_size).items()})
        metrics.update({k: float(v) for k, v in reward_info.items()})
        for name in self.cfg.rewards.functions:
            if f"rewards/{name}/mean" in reward_info and "accuracy" in name:
                metrics["accuracy"] = float(reward_info[f"rewards/{name}/mean"])
        metrics.update(select_info)
        metrics.update(carry_info)
        metrics.update(self._rollout_metrics(ro, mask))
        plen, n = batch.prompt_tokens.shape[1], len(rows)
        seq_tokens = n * (plen + batch.tokens.shape[1]) * self.cfg.grpo.num_iterations
        metrics.update({
            "perf/sample_s": t1 - t0,
            "perf/score_s": t2 - t1,
            "perf/logprob_s": t3 - t2,
            "perf/update_s": t4 - t3,
            "perf/sample_tokens_per_s": float(np.asarray(ro.lengths).sum()) / max(t1 - t0, 1e-9),
            "perf/update_tokens_per_s": seq_tokens / max(t4 - t3, 1e-9),
        })  # fmt: skip
        return new_state, metrics

    def _update_metrics(self, step_metrics: list[dict]) -> dict[str, float]:
        """The optimiser steps' metrics: means over them (extremes for the ratio bounds), and the largest norm."""
        stacked = {k: np.asarray([m[k] for m in step_metrics]) for k in step_metrics[0]}
        uniform = np.full(len(step_metrics), 1.0 / len(step_metrics))
        out = {k: float(v) for k, v in reduce_metrics(stacked, uniform).items()}
        out["grad_norm_max"] = float(stacked["grad_norm"].max())
        return out

    def _rollout_metrics(self, ro: rollout.Rollout, mask: np.ndarray) -> dict[str, float]:
        lengths = np.asarray(ro.lengths)
        out = {
            "response/length_mean": float(lengths.mean()),
            "response/length_max": float(lengths.max()),
            "response/clipped_frac": float(1.0 - np.asarray(ro.ended).mean()),
            "response/trained_tokens": float(mask.sum()),
        }
        if self.tools is not None:
            out.update(tool_metrics(ro, tuple(self.tools.tools)))
        return out
