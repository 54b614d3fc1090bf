"""The training loop: ``r1jax train CONFIG --out RUN_DIR [--set key=value ...]``.

A run directory holds ``train_config.json`` (the resolved TrainConfig), ``r1jax.json`` + tokenizer files (what
``r1jax.load(RUN_DIR)`` needs), ``checkpoints/<step>/`` (orbax ``CheckpointManager``: ``params``, ``train`` =
optimizer state + reference model, ``meta`` = step and counters; async saves, keep-N), ``metrics.jsonl`` (one JSON
object per step with ``"step"``) and ``tb/`` (TensorBoard events).

Resuming is exact: the data order is a pure function of (seed, step), the step's PRNG key is
``fold_in(key(seed), step)``, and model + optimizer + reference model are restored from the newest checkpoint that
restores cleanly (a damaged newest one is skipped with a warning). SIGTERM (TPU preemption) finishes the current
step, saves and exits with status 143; running the same command again continues. A step whose loss or gradients are
not finite leaves parameters and optimizer state untouched and is counted; ``max_consecutive_skips`` in a row stop
the run with an error, keeping the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from r1jax.config import ModelConfig, Stage, TrainConfig, to_json
from r1jax.errors import ConfigError, R1jaxError
from r1jax.overrides import apply_overrides, config_keys  # noqa: F401  (re-exported)

SIGTERM_EXIT = 143


class TrainingError(R1jaxError):
    """A run that cannot go on (e.g. too many non-finite steps); the last good checkpoint is kept."""


# --- configs ----------------------------------------------------------------------------------------------------------
def load_config(name_or_path: str) -> TrainConfig:
    """A preset name from ``configs/`` or a path to a ``.py`` file defining ``config() -> TrainConfig``."""
    if name_or_path.endswith(".py"):
        if not os.path.exists(name_or_path):
            raise ConfigError(f"{name_or_path}: no such config file")
        spec = importlib.util.spec_from_file_location("r1jax_user_config", name_or_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not hasattr(module, "config"):
            raise ConfigError(f"{name_or_path}: defines no config() function")
        cfg = module.config()
    else:
        from r1jax.configs import PRESETS

        if name_or_path not in PRESETS:
            close = difflib.get_close_matches(name_or_path, PRESETS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(PRESETS))}"
            raise ConfigError(f"unknown config {name_or_path!r}{hint}")
        cfg = PRESETS[name_or_path]()
    if not isinstance(cfg, TrainConfig):
        raise ConfigError(f"{name_or_path}: config() must return a TrainConfig, got {type(cfg).__name__}")
    return cfg


# --- run directory ----------------------------------------------------------------------------------------------------
def check_output_dir(out_dir: str, need_bytes: int) -> None:
    """Fail at start, not mid-run: the directory must be creatable, writable and have room for checkpoints."""
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{jax.process_index()}"  # one per process of a multi-host run
        probe.write_bytes(b"0")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{out_dir}: output directory is not writable ({e.strerror})") from None
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise ConfigError(
            f"{out_dir}: {free / 2**30:.2f} GiB free, checkpoints need about {need_bytes / 2**30:.2f} GiB — "
            "free space or choose another --out"
        )


class MetricsLog:
    """``metrics.jsonl`` (appended and flushed per step; on resume, lines past the restored step are dropped) and
    TensorBoard event files."""

    def __init__(self, run_dir: Path, start_step: int, enabled: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        if enabled and self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= start_step:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut by a crash
            self.path.write_text("".join(x + "\n" for x in kept))
        self._tb = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:
                self._tb = None

    def write(self, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {
            k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v) for k, v in metrics.items()
        }
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in clean.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()
        if self._tb is not None:
            step = int(metrics["step"])
            for k, v in clean.items():
                if k != "step" and isinstance(v, float):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class Checkpoints:
    """Orbax CheckpointManager with items ``params``, ``train`` and ``meta``."""

    def __init__(self, run_dir: Path, keep: int, async_save: bool = True):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(
            (run_dir / "checkpoints").absolute(), options=options, item_names=("params", "train", "meta")
        )

    def save(self, step: int, params, train, meta: dict, *, wait: bool = False) -> None:
        a = self.ocp.args
        self.manager.save(
            step,
            args=a.Composite(params=a.StandardSave(params), train=a.StandardSave(train), meta=a.JsonSave(meta)),
            force=True,
        )
        if wait:
            self.manager.wait_until_finished()

    def restore_newest(self, abstract_params, abstract_train):
        """(step, params, train, meta) from the newest checkpoint that restores, or None if there is none."""
        a = self.ocp.args
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                out = self.manager.restore(
                    step,
                    args=a.Composite(
                        params=a.StandardRestore(abstract_params),
                        train=a.StandardRestore(abstract_train),
                        meta=a.JsonRestore(),
                    ),
                )
                for bad in damaged:  # so that training can write these steps again
                    self.manager.delete(bad)
                return step, out["params"], out["train"], out["meta"]
            except Exception as e:  # damaged or half-written: fall back to the previous one
                damaged.append(step)
                warnings.warn(
                    f"checkpoint step {step} cannot be restored ({e.__class__.__name__}); trying the previous one",
                    stacklevel=2,
                )
        return None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# --- model, tokenizer, data -------------------------------------------------------------------------------------------
def start_params(cfg: TrainConfig, model, mesh=None):
    """The parameters training starts from: the model's, with ``cfg.lora``'s adapters attached (placed on ``mesh``
    like every parameter) when LoRA is on."""
    from r1jax import lora

    params = model.param_dict()
    if not cfg.lora.enabled:
        return params
    params = lora.attach(params, cfg.lora, model.cfg, jax.random.fold_in(jax.random.key(cfg.seed), 1))
    if mesh is not None:
        params = jax.device_put(params, lora.shardings(params, model.cfg, mesh))
    return params


def init_model(cfg: TrainConfig, mesh=None, *, abstract: bool = False):
    """The policy to start from, placed on ``mesh``: ``cfg.init`` (HF dir, GGUF, r1jax checkpoint; its architecture,
    with the numerics of ``cfg.model`` when the config has one) or a random ``cfg.model``. ``abstract``: its
    parameters' shapes, dtypes and shardings only (a resumed run restores its own checkpoint instead)."""
    from r1jax.checkpoint import abstract_params, load
    from r1jax.model import Transformer

    mtp = cfg.mtp.enabled  # the MTP module trains only with the MTP loss
    if cfg.init:
        model = load(cfg.init, mesh=mesh, numerics=cfg.model, abstract=abstract, mtp=mtp)
    elif cfg.model is not None and abstract:
        model = Transformer(cfg.model, abstract_params(cfg.model, mesh, mtp=mtp))
    elif cfg.model is not None:
        model = Transformer.random(cfg.model, cfg.seed, mesh=mesh, mtp=mtp)
    else:
        raise ConfigError("the config has neither init (a checkpoint to start from) nor model (to initialise)")
    if mtp and "mtp" not in model.param_dict():
        raise ConfigError(
            f"mtp.weight > 0 needs the model's MTP module: {cfg.init or 'the model'} has none (n_mtp_layers = "
            f"{model.cfg.n_mtp_layers}; convert the checkpoint with --mtp)"
        )
    return model


def check_mesh(cfg: TrainConfig, mesh) -> None:
    """Every batch the run places must split evenly over the mesh's data axes (the ``batch`` rule)."""
    from r1jax.sharding import RULES

    if mesh is None:
        return
    sizes = dict(mesh.shape)
    data = math.prod(sizes.get(a, 1) for a in RULES["batch"])
    if cfg.stage == Stage.GRPO:
        rows = {"grpo.prompts_per_step x grpo.group_size": cfg.grpo.samples_per_step, "micro_batch": cfg.micro_batch}
    else:
        rows = {"sft_pack": cfg.sft_pack} if cfg.sft_pack else {"sft_batch_size": cfg.sft_batch_size}
    if cfg.stage == Stage.GRPO and cfg.grpo.max_off_policy_steps and mesh.size > 1:
        from r1jax.sharding import split_mesh

        split_mesh(mesh)  # raises when the mesh cannot be split
        data //= 2  # the trainer half
    for name, n in rows.items():
        if n % data:
            raise ConfigError(
                f"mesh {sizes}: its data axes ({' x '.join(RULES['batch'])} = {data} devices) do not divide {name} "
                f"= {n}; choose a mesh or batch size that divides"
            )


# --- the loop ---------------------------------------------------------------------------------------------------------
class _Preempt:
    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            self.requested = True

        try:
            self._old = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _need_bytes(params, keep: int) -> int:
    n = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    return int(n * 4 * (keep + 1))  # params + 2 Adam moments + reference, per kept checkpoint


def _progress(total: int, start: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)


def run(cfg: TrainConfig, out_dir: str, *, mesh=None, progress: bool = True, max_steps: int | None = None) -> dict:
    """Train (or resume) into ``out_dir``; returns the last step's metrics. ``mesh`` (the caller's) shards the
    model and batch; ``max_steps`` stops early, resumably."""
    from r1jax import lora
    from r1jax.data.tokenizer import for_model
    from r1jax.param_source import params_candidates
    from r1jax.sharding import normalize_mesh

    run_dir = Path(out_dir)
    mesh = normalize_mesh(mesh) if mesh is not None else None
    check_mesh(cfg, mesh)
    resuming = bool(params_candidates(out_dir))  # then the start point is never read, only its shapes
    model = init_model(cfg, mesh, abstract=resuming and not cfg.lora.enabled)  # (a LoRA run saves no base)
    resolved = to_json(dataclasses.replace(cfg, model=model.cfg))  # the model as it trains
    _check_same_run(run_dir, resolved)
    tok = for_model(model.cfg, model.tokenizer_files, byte_fallback=True)
    params = start_params(cfg, model, mesh)
    check_output_dir(out_dir, _need_bytes(lora.saved_part(params), cfg.checkpoint.keep))
    is_main = jax.process_index() == 0
    if is_main:
        _write_run_files(run_dir, cfg, model, resolved, mtp="mtp" in params)

    stage = _make_stage(cfg, model.cfg, tok, mesh)
    ckpts = Checkpoints(run_dir, cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    state, start, counters = _resume(cfg, stage, ckpts, params, mesh, resuming)
    log = MetricsLog(run_dir, start, enabled=is_main)
    evaluator = Evaluator(cfg, model.cfg, tok, mesh) if cfg.eval.every else None
    if evaluator is not None and start == 0:
        log.write({"step": 0, **evaluator(stage.params(state))})
    bar = _progress(cfg.steps, start, progress and is_main)
    data = stage.data(start)
    total = cfg.steps if max_steps is None else min(cfg.steps, start + max_steps)
    last: dict = {}
    step = start
    with _Preempt() as preempt:
        try:
            while step < total:
                t0 = time.perf_counter()
                state, metrics = stage.step(state, next(data), step_key(cfg, step))
                step += 1
                _count_skips(counters, metrics)
                metrics = {
                    **metrics,
                    "step": step,
                    "time/step_s": time.perf_counter() - t0,
                    "skipped_steps": counters["skipped_steps"],
                    "data/skipped_prompts": data.skipped,
                }
                if evaluator is not None and evaluator.due(step, cfg.steps):
                    metrics.update(evaluator(stage.params(state)))
                log.write(metrics)
                last = metrics
                _stop_if_stuck(counters, cfg.max_consecutive_skips, step, out_dir)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{metrics[k]:.3g}" for k in stage.headline if k in metrics})
                if step % cfg.checkpoint.every == 0 or step == total or preempt.requested:
                    save_params, save_train = stage.to_save(state)
                    ckpts.save(step, lora.saved_part(save_params), save_train, {"step": step, "counters": counters},
                               wait=preempt.requested or step == total)  # fmt: skip
                if preempt.requested:
                    break
        finally:
            ckpts.close()
            log.close()
            if bar is not None:
                bar.close()
    if preempt.requested:
        print(f"r1jax: SIGTERM: saved step {step} in {out_dir}; run the same command to resume", file=sys.stderr)
        raise SystemExit(SIGTERM_EXIT)
    return last


def _check_same_run(run_dir: Path, resolved: dict) -> None:
    """A run directory resumes only under the config it was started with."""
    saved = run_dir / "train_config.json"
    if saved.exists():
        before = json.loads(saved.read_text())
        if before != resolved:
            diff = sorted(_diff_keys(before, resolved))
            raise ConfigError(
                f"{run_dir} holds a run with a different config ({', '.join(diff[:3])} differ): "
                "use a new --out or the same config to resume"
            )


def _write_run_files(run_dir: Path, cfg: TrainConfig, model, resolved: dict, *, mtp: bool) -> None:
    """``train_config.json``, the run's ``r1jax.json`` (what ``r1jax.load(RUN)`` reads) and the tokenizer files."""
    from r1jax.param_source import META, checkpoint_meta

    (run_dir / "train_config.json").write_text(json.dumps(resolved, indent=2))
    extra = {}
    if cfg.lora.enabled:  # the checkpoints hold adapters: the base is the start point, read again to load
        extra["lora"] = {**to_json(cfg.lora), "base": cfg.init, "seed": cfg.seed}
    meta = checkpoint_meta(model.cfg, model.hf_config, mtp=mtp, fmt=1, **extra)
    (run_dir / META).write_text(json.dumps(meta, indent=2))
    for name, text in model.tokenizer_files.items():
        (run_dir / name).write_text(text)


def _resume(cfg: TrainConfig, stage, ckpts, params, mesh, resuming: bool) -> tuple[Any, int, dict]:
    """(state, first step, counters): the newest intact checkpoint's, or a fresh start from ``params``."""
    from r1jax import lora

    counters = {"skipped_steps": 0, "consecutive_skips": 0}
    state = _abstract_init(stage.init, params) if resuming else stage.init(params)
    abstract_params, abstract_train = stage.abstract(state)
    restored = ckpts.restore_newest(lora.saved_part(abstract_params), abstract_train)
    if restored is not None:
        start, r_params, r_train, r_meta = restored
        counters.update(r_meta.get("counters", {}))
        return stage.restore(start, lora.restored(params, r_params), r_train), start, counters
    if resuming and not cfg.lora.enabled:  # every saved step was damaged: start over from the start point
        state = stage.init(start_params(cfg, init_model(cfg, mesh), mesh))
    return state, 0, counters


def _count_skips(counters: dict, metrics: dict) -> None:
    """Count the steps skipped for a non-finite loss or gradient, in all and in a row."""
    finite = all(math.isfinite(metrics.get(k, 0.0)) for k in ("loss", "grad_norm"))
    if metrics.get("skipped", 0.0) > 0 or not finite:
        counters["skipped_steps"] += 1
        counters["consecutive_skips"] += 1
    else:
        counters["consecutive_skips"] = 0


def _stop_if_stuck(counters: dict, limit: int, step: int, out_dir: str) -> None:
    """Too many skipped steps in a row stop the run; its last good checkpoint is kept."""
    if counters["consecutive_skips"] >= limit:
        raise TrainingError(
            f"{counters['consecutive_skips']} consecutive steps with non-finite loss or gradients (at step {step}); "
            f"the last good checkpoint is kept in {out_dir}/checkpoints — lower the learning rate or check the data"
        )


def _diff_keys(a: Any, b: Any, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = set()
        for k in set(a) | set(b):
            out |= _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return set() if a == b else {prefix.rstrip(".")}


@dataclasses.dataclass(frozen=True)
class _Policy:
    """The current parameters in the shape ``r1jax.evaluate`` takes a model."""

    cfg: ModelConfig
    params: Any

    def param_dict(self):
        return self.params


class Evaluator:
    """``cfg.eval``: accuracy of the current policy on held-out problems, as ``eval/*`` metrics."""

    def __init__(self, cfg: TrainConfig, model_cfg: ModelConfig, tok, mesh=None):
        self.cfg, self.model_cfg, self.tok, self.mesh = cfg, model_cfg, tok, mesh
        self.dataset = dataset_for(cfg, cfg.eval.split)
        self.rewards = dataclasses.replace(cfg.rewards, functions=("accuracy",), weights=(1.0,))
        self.tools = None
        if cfg.tools.enabled:  # evaluate with the tools the policy is trained with
            from r1jax.tools import build_tools

            self.tools = build_tools(cfg.tools, forbidden=cfg.sampling.stop_strings)

    def due(self, step: int, total: int) -> bool:
        return bool(self.cfg.eval.every) and (step % self.cfg.eval.every == 0 or step == total)

    def __call__(self, params) -> dict[str, float]:
        from r1jax.evaluate import evaluate

        e, t0 = self.cfg.eval, time.perf_counter()
        m = evaluate(
            _Policy(self.model_cfg, params), self.tok, self.dataset, k=e.k, temperature=e.temperature,
            top_p=e.top_p, max_new_tokens=e.max_new_tokens or self.cfg.sampling.max_new_tokens,
            template=self.cfg.data.template, system=self.cfg.data.system,
            stop_strings=self.cfg.sampling.stop_strings, limit=e.limit, batch_size=e.batch_size, seed=self.cfg.seed,
            rewards=self.rewards, tools=self.tools, mesh=self.mesh,
        )  # fmt: skip
        out = {f"eval/{k}": float(v) for k, v in m.items() if k not in ("n_problems", "k")}
        return {**out, "time/eval_s": time.perf_counter() - t0}


def _abstract(tree):
    """Restore targets: each leaf's shape, dtype and sharding (orbax then reads only this process's slices)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _abstract_init(init, params):
    """What ``init(params)`` returns, as shapes, dtypes and shardings, with nothing computed: the targets a resumed
    run restores into, so that its start point (model and optimiser state) never sits in memory beside them."""
    shapes = jax.eval_shape(init, params)
    shardings = jax.jit(init).lower(params).compile().output_shardings
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes, shardings)


def _make_stage(cfg: TrainConfig, model_cfg: ModelConfig, tok, mesh=None):
    if cfg.stage == Stage.GRPO:
        return GRPOStage(cfg, model_cfg, tok, mesh)
    return SFTStage(cfg, model_cfg, tok, mesh)


def dataset_for(cfg: TrainConfig, split: str | None = None):
    from r1jax.data.datasets import load_dataset

    d = cfg.data
    split = split or d.split
    return load_dataset(d.name, split, data_dir=d.data_dir, seed=cfg.seed, source=d.source, **d.option_dict())


def training_batches(cfg: TrainConfig, tok, batch_size: int, start: int, max_prompt_tokens: int):
    """The global batches from step ``start`` on (a pure function of seed and step: resumes exactly), the same on
    every process: each places only its own devices' rows (``r1jax.sharding.put``)."""
    from r1jax.data.datasets import batches

    d = cfg.data
    return batches(
        dataset_for(cfg),
        batch_size,
        cfg.seed,
        start,
        tokenizer=tok,
        template=d.template,
        system=d.system,
        max_prompt_tokens=max_prompt_tokens,
    )


class GRPOStage:
    """GRPO: prompts from ``cfg.data``, sampled in groups, scored by the reward functions, one policy update."""

    headline = ("reward/mean", "accuracy", "kl", "response/length_mean")

    def __init__(self, cfg: TrainConfig, model_cfg: ModelConfig, tok, mesh=None):
        from r1jax import grpo
        from r1jax.data.tokenizer import stop_ids

        self.cfg, self.model_cfg, self.tok = cfg, model_cfg, tok
        self._peek: dict | None = None  # read-ahead batches by step (off-policy sampling)
        stops = stop_ids(model_cfg, tok)
        reward = grpo.text_reward(cfg, tok.decode, stops)
        self.trainer = grpo.GRPOTrainer(
            cfg, model_cfg, reward, mesh=mesh, stop_ids=stops, encode=tok.encode, decode=tok.decode
        )

    def init(self, params):
        return self.trainer.init_state(params)

    def abstract(self, state):
        return _abstract(state.params), _abstract({"opt": state.opt_state, "ref": state.ref_params or {}})

    def restore(self, step: int, params, train):
        from r1jax.grpo import GRPOState

        ref = train["ref"] or None
        return GRPOState(step=jnp.asarray(step, jnp.int32), params=params, ref_params=ref, opt_state=train["opt"])

    def to_save(self, state):
        return state.params, {"opt": state.opt_state, "ref": state.ref_params or {}}

    def params(self, state):
        return state.params

    def data(self, start: int):
        return training_batches(
            self.cfg, self.tok, self.cfg.grpo.prompts_per_step, start, self.cfg.data.max_prompt_tokens
        )

    def step(self, state, batch, key):
        return self.trainer.grpo_step(state, *_prompts_and_metas(batch), key, ahead=self._ahead(int(state.step)))

    def _ahead(self, step: int) -> list:
        """The next ``grpo.max_off_policy_steps`` steps' (prompts, metadata, key), read ahead of the loop's own
        iterator (batches are a pure function of the step) for the trainer's off-policy sampling."""
        k = self.cfg.grpo.max_off_policy_steps
        if not k:
            return []
        if self._peek is None or min(self._peek, default=step + 1) > step + 1:
            self._peek, self._peek_iter, self._peek_next = {}, self.data(step + 1), step + 1
        while self._peek_next <= step + k:
            self._peek[self._peek_next] = next(self._peek_iter)
            self._peek_next += 1
        for s in [s for s in self._peek if s <= step]:
            del self._peek[s]
        return [(*_prompts_and_metas(self._peek[s]), step_key(self.cfg, s)) for s in range(step + 1, step + k + 1)]


def _prompts_and_metas(batch) -> tuple[list, list]:
    return [ex["prompt_ids"] for ex in batch], [{k: v for k, v in ex.items() if k != "prompt_ids"} for ex in batch]


def step_key(cfg: TrainConfig, step: int) -> jax.Array:
    """The PRNG key of a training step: a pure function of the seed and the step (resumes exactly)."""
    return jax.random.fold_in(jax.random.key(cfg.seed), step)


class SFTStage:
    """SFT / distillation: ``sft_batch_size`` (prompt, completion) pairs per step in rows of ``data.seq_len``, one
    each, or with ``sft_pack`` packed first-fit into as few rows as hold them (rounded up to a multiple of
    ``sft_pack``; the examples per step stay fixed, so resume replays the same batches).

    The completion is the example's ``completion`` (e.g. ``r1jax sample`` traces, R1 stage 3) or its reference
    ``solution`` (cold start on worked solutions); the prompt goes through ``data.template``. With ``tools.tools`` set,
    the result blocks of those tools in a completion are context with loss weight 0 (``sft.tokenize_tool_trace``).
    """

    headline = ("loss", "token_accuracy")

    def __init__(self, cfg: TrainConfig, model_cfg: ModelConfig, tok, mesh=None):
        from r1jax.optim import make_optimizer

        self.cfg, self.model_cfg, self.tok, self.mesh = cfg, model_cfg, tok, mesh
        self.optimizer = make_optimizer(cfg.optim)

    def init(self, params):
        from r1jax.optim import init_opt_state
        from r1jax.sharding import commit

        params = commit(params) if self.mesh is None else params  # on a mesh, start_params placed them
        return {"params": params, "opt": init_opt_state(self.optimizer, params, self.model_cfg, self.mesh)}

    def abstract(self, state):
        return _abstract(state["params"]), _abstract({"opt": state["opt"]})

    def restore(self, step: int, params, train):
        return {"params": params, "opt": train["opt"]}

    def to_save(self, state):
        return state["params"], {"opt": state["opt"]}

    def params(self, state):
        return state["params"]

    def data(self, start: int):
        d = self.cfg.data
        return training_batches(
            self.cfg, self.tok, self.cfg.sft_batch_size, start, min(d.max_prompt_tokens, d.seq_len - 1)
        )

    def step(self, state, batch, key):
        from r1jax.sft import pack_examples, sft_step, tokenize_tool_trace, tokenize_trace
        from r1jax.sharding import batch_sharding, on_mesh, put

        pairs = []
        for ex in batch:
            completion = ex.get("completion", ex.get("solution"))
            if completion is None:
                raise ConfigError("SFT examples need a 'completion' (or 'solution') field")
            if self.cfg.tools.enabled:
                tools = self.cfg.tools.tools
                pairs.append(tokenize_tool_trace(ex["prompt_text"], completion, self.tok.encode, tools=tools,
                                                 eos_id=self.tok.eos_id))  # fmt: skip
            else:
                pairs.append(tokenize_trace(ex["prompt_text"], completion, self.tok.encode, eos_id=self.tok.eos_id))
        pack = self.cfg.sft_pack
        packed = pack_examples(pairs, self.cfg.data.seq_len, num_rows=None if pack else len(pairs),
                               row_multiple=pack or 1, pad_id=self.tok.eos_id or 0)  # fmt: skip
        rows = len(packed["tokens"])
        if self.mesh is not None:  # every process packed the whole batch; each places its devices' rows
            packed = {k: put(v, batch_sharding(self.mesh, v.shape)) for k, v in packed.items()}
        micro = max(1, rows // (self.cfg.micro_batch_size or rows))
        with on_mesh(self.mesh):
            params, opt, m = sft_step(
                state["params"],
                state["opt"],
                packed,
                cfg=self.model_cfg,
                optimizer=self.optimizer,
                micro_batches=micro,
                router_bias_gamma=self.cfg.optim.router_bias_gamma,
                mtp=self.cfg.mtp if self.cfg.mtp.enabled else None,
            )
        metrics = {k: float(v) for k, v in jax.device_get(m).items()}
        return {"params": params, "opt": opt}, metrics | {"rows": float(rows)}
