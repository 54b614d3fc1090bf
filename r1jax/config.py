"""Frozen configuration dataclasses.

Derived values are properties; invariants are checked in ``__post_init__``. Algorithm choices are enums.
The mesh belongs to the caller, never to a config.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping

from r1jax.tools.protocol import syntax_of

# --- model ---------------------------------------------------------------------------------------------------------


class Arch(enum.StrEnum):
    """HF ``model_type`` values r1jax reads."""

    DEEPSEEK_V3 = "deepseek_v3"
    DEEPSEEK_V2 = "deepseek_v2"
    QWEN2 = "qwen2"
    QWEN3 = "qwen3"
    LLAMA = "llama"


class RopeType(enum.StrEnum):
    DEFAULT = "default"
    LINEAR = "linear"
    LLAMA3 = "llama3"
    YARN = "yarn"


class Scoring(enum.StrEnum):
    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"


class TopkMethod(enum.StrEnum):
    GREEDY = "greedy"  # plain top-k over all experts (V2)
    GROUP_LIMITED_GREEDY = "group_limited_greedy"  # keep topk_group groups by their max score (V2)
    NOAUX_TC = "noaux_tc"  # keep topk_group groups by the sum of their top-2 biased scores (V3)


class AttentionImpl(enum.StrEnum):
    XLA = "xla"
    PALLAS = "pallas"


def _as_enum(enum_cls: type[enum.Enum], value: object, field: str) -> enum.Enum:
    """Accept an enum member or its string value (for ``--set`` overrides); reject anything else."""
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in enum_cls)
        raise ValueError(f"{field}={value!r}: expected one of {choices}") from None


DENSE_LAYERS, MOE_LAYERS = "dense_layers", "moe_layers"  # the layer stacks' names in the parameter tree


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding and its context-extension scaling (HF ``rope_scaling`` / ``rope_parameters``)."""

    theta: float = 10000.0
    type: RopeType = RopeType.DEFAULT
    factor: float = 1.0
    original_max_position: int | None = None
    beta_fast: float = 32.0  # YaRN
    beta_slow: float = 1.0  # YaRN
    mscale: float | None = None  # YaRN, DeepSeek
    mscale_all_dim: float | None = None  # YaRN, DeepSeek: softmax-scale correction
    attention_factor: float | None = None  # YaRN: explicit cos/sin scale
    truncate: bool = True  # YaRN: round the correction range to whole dims
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3

    def __post_init__(self):
        object.__setattr__(self, "type", _as_enum(RopeType, self.type, "rope.type"))
        if self.factor <= 0:
            raise ValueError(f"rope factor must be positive, got {self.factor}")
        if self.type in (RopeType.YARN, RopeType.LLAMA3) and self.original_max_position is None:
            raise ValueError(f"rope type {self.type} needs original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One transformer: DeepSeek-V2/V3 (MLA + MoE + MTP) or a dense GQA model (Qwen2/Qwen3/Llama).

    Field names follow the einsum alphabet of ``model.py``: d_model (d), n_heads (h), n_kv_heads (g), q_lora_rank (q),
    kv_lora_rank (c), qk_nope_dim (n), qk_rope_dim (p), v_head_dim (v), n_experts (e), experts_per_token (k), ffw (f),
    vocab_size (V).
    """

    arch: Arch
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    ffw: int
    n_kv_heads: int | None = None  # None: = n_heads
    head_dim: int | None = None  # GQA; None: d_model // n_heads
    # MLA (DeepSeek)
    q_lora_rank: int | None = None  # None: plain q projection
    kv_lora_rank: int = 512
    qk_nope_dim: int = 128
    qk_rope_dim: int = 64
    v_head_dim: int = 128
    # MoE (DeepSeek)
    n_experts: int = 0  # 0: dense model
    n_shared_experts: int = 0
    experts_per_token: int = 0
    moe_ffw: int = 0
    first_k_dense: int = 0
    n_group: int = 1
    topk_group: int = 1
    scoring: Scoring = Scoring.SOFTMAX
    topk_method: TopkMethod = TopkMethod.GREEDY
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    n_mtp_layers: int = 0
    # shared
    rope: RopeConfig = RopeConfig()
    rope_interleave: bool = False  # DeepSeek rotates adjacent pairs (x[2i], x[2i+1])
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # numerics and kernels (not part of the checkpoint)
    dtype: str = "float32"  # activations / matmuls
    param_dtype: str = "float32"
    attention_impl: AttentionImpl = AttentionImpl.XLA
    remat: bool = False  # recompute each layer's forward in the backward pass, keeping what remat_policy names
    remat_policy: str = "full"  # with remat: "full" keeps the layer input (and expert rows), "dots" + projections
    # an expert shard receives dispatch_slack x its mean rows per dispatch round (expert_parallel.round_rows)
    dispatch_slack: float = 1.25

    def __post_init__(self):
        for name, cls in (
            ("arch", Arch),
            ("scoring", Scoring),
            ("topk_method", TopkMethod),
            ("attention_impl", AttentionImpl),
        ):
            object.__setattr__(self, name, _as_enum(cls, getattr(self, name), name))
        if isinstance(self.rope, dict):
            object.__setattr__(self, "rope", RopeConfig(**self.rope))
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "ffw"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.remat_policy not in ("full", "dots"):
            raise ValueError(f"remat_policy must be 'full' or 'dots', got {self.remat_policy!r}")
        if self.dispatch_slack <= 0:
            raise ValueError(f"dispatch_slack must be positive, got {self.dispatch_slack}")
        if self.n_heads % self.num_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.num_kv_heads})")
        if self.is_moe:
            if not 0 < self.experts_per_token <= self.n_experts:
                raise ValueError(f"experts_per_token must be in [1, {self.n_experts}], got {self.experts_per_token}")
            if self.n_experts % self.n_group or not 0 < self.topk_group <= self.n_group:
                raise ValueError(
                    f"bad expert groups: {self.n_experts} experts, n_group {self.n_group}, topk_group {self.topk_group}"
                )
            if self.experts_per_token > self.topk_group * (self.n_experts // self.n_group):
                raise ValueError("experts_per_token exceeds the experts in the kept groups")
            if not 0 <= self.first_k_dense <= self.n_layers:
                raise ValueError(f"first_k_dense must be in [0, n_layers], got {self.first_k_dense}")
        if self.is_mla and self.qk_rope_dim % 2:
            raise ValueError(f"qk_rope_dim must be even, got {self.qk_rope_dim}")
        if not self.is_mla and self.head_size % 2:
            raise ValueError(f"head_dim must be even, got {self.head_size}")

    # derived -----------------------------------------------------------------------------------------------------
    @property
    def is_mla(self) -> bool:
        return self.arch in (Arch.DEEPSEEK_V2, Arch.DEEPSEEK_V3)

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def num_kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_dim + self.qk_rope_dim if self.is_mla else self.head_size

    @property
    def n_dense_layers(self) -> int:
        return self.first_k_dense if self.is_moe else self.n_layers

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_dim if self.is_mla else self.head_size

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    def numerics(self) -> dict[str, object]:
        """The ``NUMERICS`` fields: how this model computes, as opposed to what it is."""
        return {name: getattr(self, name) for name in NUMERICS}

    def with_numerics(self, numerics: ModelConfig | Mapping[str, object]) -> ModelConfig:
        """This architecture with the numerics of a run's model config (or a mapping of some ``NUMERICS`` fields):
        the one place where a checkpoint's config and a run's precision, kernels and remat meet."""
        values = numerics.numerics() if isinstance(numerics, ModelConfig) else dict(numerics)
        unknown = set(values) - set(NUMERICS)
        if unknown:
            raise ValueError(f"{sorted(unknown)} are architecture, not numerics ({', '.join(NUMERICS)})")
        return dataclasses.replace(self, **values)


# ModelConfig fields that a run sets and a checkpoint never does (``ModelConfig.with_numerics``); the optimiser's
# moment dtype is the run's too (``OptimConfig.moment_dtype``).
NUMERICS = ("dtype", "param_dtype", "attention_impl", "remat", "remat_policy", "dispatch_slack")


# --- RL --------------------------------------------------------------------------------------------------------------


class LossAgg(enum.StrEnum):
    """How per-token GRPO losses become one scalar (see ``r1jax.loss.grpo_loss``).

    GRPO: mean over sequences of each sequence's masked token mean (DeepSeekMath / R1; short answers weigh more per
    token). DAPO: token mean over the whole batch. DR_GRPO: token sum / (num sequences x max_completion_len).
    """

    GRPO = "grpo"
    DAPO = "dapo"
    DR_GRPO = "dr_grpo"


class AdvScale(enum.StrEnum):
    """Divisor of the group-centred reward: the group's std, the whole batch's std, or nothing (Dr. GRPO)."""

    GROUP = "group"
    BATCH = "batch"
    NONE = "none"


class RatioLevel(enum.StrEnum):
    """Importance ratio per token (PPO/GRPO) or per sequence (GSPO: exp of the mean token log-ratio)."""

    TOKEN = "token"
    SEQUENCE = "sequence"


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Group Relative Policy Optimisation. Paper symbols: G = group_size, eps = clip_eps_*, beta = kl_coef,
    mu = num_iterations.

    Defaults follow DeepSeek-R1 where it states a value (G=16, beta=0.001, one inner epoch) and PPO's clip 0.2
    otherwise (R1 reports eps=10, which effectively disables clipping). DAPO: ``loss_agg="dapo"``,
    ``clip_eps_high=0.28``, ``kl_coef=0``, ``dynamic_sampling=True``, ``overlong_filter=True``. Dr. GRPO:
    ``loss_agg="dr_grpo"``, ``adv_scale="none"``. GSPO: ``ratio_level="sequence"`` with small clips (3e-4 / 4e-4).
    """

    group_size: int = 16  # G: completions sampled per prompt
    clip_eps_low: float = 0.2  # ratio clipped below at 1 - eps_low
    clip_eps_high: float = 0.2  # ratio clipped above at 1 + eps_high (DAPO clip-higher: 0.28)
    kl_coef: float = 0.001  # beta of the k3 KL-to-reference term in the loss; 0 disables it
    loss_agg: LossAgg = LossAgg.GRPO
    adv_scale: AdvScale = AdvScale.GROUP
    max_completion_len: int = 1024  # tokens; also the Dr. GRPO constant normaliser
    ratio_level: RatioLevel = RatioLevel.TOKEN
    tis_cap: float | None = None  # truncated importance sampling cap on pi_old / pi_sampler; None = off
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal (no signal)
    overlong_filter: bool = False  # DAPO: mask out completions truncated at max length without EOS
    std_eps: float = 1e-4  # added to the std before dividing
    std_ddof: int = 0  # 0 = population std (default), 1 = Bessel-corrected (TRL / verl parity)
    num_iterations: int = 1  # mu: policy updates per batch of samples (1 = on-policy, ratio == 1 at the start)
    num_minibatches: int = 1  # optimiser steps per batch of samples per iteration
    prompts_per_step: int = 32  # prompts per sampling step (R1: 32 x G=16 = 512 samples)
    ref_update_every: int = 0  # replace the reference model by the policy every N steps (R1: 400); 0 = never
    # Run each group's prompt through the model once, not G times: the teacher-forced log-probs (pi_old, pi_ref and
    # the update) prefill the prompt and run the completions against its repeated KV cache. Exact (the sampler's
    # computation); saves (G - 1) / G of the prompt FLOPs. Completion tokens then attend with plain XLA attention
    # over the cache, not the Pallas kernels, so keep it off for long sequences on TPU.
    shared_prompt: bool = False
    # Off-policy overlap: sample up to this many steps ahead, with the weights of the step that launched the
    # sampling, while the update runs (on a mesh the devices split into a trainer and a sampler half along a batch
    # axis, and the weights are resharded onto the sampler half after each update). Needs tis_cap (the importance
    # correction of the stale samples). 0 = synchronous.
    max_off_policy_steps: int = 0
    # MoE routing replay (R3): the sampler records each token's experts and the teacher-forced passes (pi_old,
    # pi_ref, the update) route with them, gated by the current router, so routing flips between the decode path
    # and the training forward do not add to the sampler/trainer mismatch. Needs a model with MoE layers.
    routing_replay: bool = False

    def __post_init__(self) -> None:
        for name, cls in (("loss_agg", LossAgg), ("adv_scale", AdvScale), ("ratio_level", RatioLevel)):
            object.__setattr__(self, name, _as_enum(cls, getattr(self, name), name))
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.clip_eps_low < 0 or self.clip_eps_high < 0:
            raise ValueError(f"clip eps must be >= 0, got low={self.clip_eps_low} high={self.clip_eps_high}")
        if self.clip_eps_low >= 1:
            raise ValueError(f"clip_eps_low must be < 1 (ratio lower bound 1 - eps > 0), got {self.clip_eps_low}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.max_completion_len < 1:
            raise ValueError(f"max_completion_len must be >= 1, got {self.max_completion_len}")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"tis_cap must be > 0 or None, got {self.tis_cap}")
        if self.std_eps < 0:
            raise ValueError(f"std_eps must be >= 0, got {self.std_eps}")
        if self.std_ddof not in (0, 1):
            raise ValueError(f"std_ddof must be 0 or 1, got {self.std_ddof}")
        if self.std_ddof == 1 and self.group_size < 2 and self.adv_scale is AdvScale.GROUP:
            raise ValueError("Bessel-corrected group std needs group_size >= 2")
        if self.num_iterations < 1 or self.num_minibatches < 1 or self.prompts_per_step < 1:
            raise ValueError("num_iterations, num_minibatches and prompts_per_step must be >= 1")
        if self.samples_per_step % self.num_minibatches:
            raise ValueError(f"samples_per_step={self.samples_per_step} not divisible by {self.num_minibatches=}")
        if self.ref_update_every < 0:
            raise ValueError(f"ref_update_every must be >= 0, got {self.ref_update_every}")
        if self.max_off_policy_steps < 0:
            raise ValueError(f"max_off_policy_steps must be >= 0, got {self.max_off_policy_steps}")
        if self.max_off_policy_steps and self.tis_cap is None:
            raise ValueError("grpo.max_off_policy_steps needs grpo.tis_cap: the importance weight of stale samples")

    @property
    def samples_per_step(self) -> int:
        return self.prompts_per_step * self.group_size

    @property
    def minibatch_size(self) -> int:
        return self.samples_per_step // self.num_minibatches


LANGUAGES = frozenset({"en", "zh", "ja", "ko", "ru", "ar"})  # language-consistency targets


class CodeSandbox(enum.StrEnum):
    """Where the ``code`` reward runs programs: the bubblewrap sandbox, or (unsafe) directly on the host."""

    BWRAP = "bwrap"
    NONE = "none"  # UNSAFE: no isolation, only rlimits and the deadline; warned about on every program


class CodeScore(enum.StrEnum):
    """The ``code`` reward's value: the fraction of tests passed, or 1 only when all pass."""

    FRACTION = "fraction"
    ALL = "all"


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Rule-based rewards: which functions, their weights, and how they are run (see ``r1jax.rewards``).

    The total reward is ``sum(weight_i * fn_i)``. Every (function, completion) pair is scored in a worker process
    with a wall-clock timeout and an address-space bound; a timeout or crash scores ``floor``.
    """

    functions: tuple[str, ...] = ("accuracy", "format_strict")  # R1: accuracy + format, equal weight
    weights: tuple[float, ...] = (1.0, 1.0)
    timeout_s: float = 5.0  # per (function, completion)
    num_workers: int = 2  # worker processes; 0 = score in-process (debugging only: no timeout, no memory bound)
    memory_mb: int = 1024  # address-space headroom per worker above its size after imports
    max_chars: int = 1 << 18  # longer completions score `floor` without being parsed
    floor: float = 0.0  # value of a timed-out / crashed / over-long evaluation
    think_prefilled: bool = False  # the chat template ends with "<think>": completions start inside the think block
    target_language: str = "en"  # language-consistency target: en, zh, ja, ko, ru, ar (meta["language"] overrides)
    gsm8k_last_number: bool = False  # GSM8K: without tags/\boxed/####, fall back to the last number in the answer
    countdown_exact_use: bool = True  # TinyZero: every given number exactly once (False: at most once)
    countdown_format_score: float = 0.1  # TinyZero: a parseable equation that misses scores this
    overlong_max_tokens: int = 1024  # DAPO soft overlong punishment: L_max
    overlong_buffer_tokens: int = 256  # DAPO: L_cache, the linear ramp before L_max
    code_sandbox: CodeSandbox = CodeSandbox.BWRAP  # "none" runs model-written code on the host: never for RL
    code_score: CodeScore = CodeScore.FRACTION
    code_wall_s: float = 10.0  # per program run (one per stdin/stdout test; one for a check(candidate) test)
    code_cpu_s: float = 5.0  # per process
    code_memory_mb: int = 512  # address space per process
    code_max_procs: int = 8  # processes per run: a run's memory is bounded by code_max_procs x code_memory_mb

    def __post_init__(self) -> None:
        object.__setattr__(self, "functions", tuple(self.functions))
        object.__setattr__(self, "code_sandbox", _as_enum(CodeSandbox, self.code_sandbox, "code_sandbox"))
        object.__setattr__(self, "code_score", _as_enum(CodeScore, self.code_score, "code_score"))
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if len(self.functions) != len(self.weights):
            raise ValueError(f"{len(self.functions)} reward functions but {len(self.weights)} weights")
        if not self.functions:
            raise ValueError("at least one reward function is required")
        if len(set(self.functions)) != len(self.functions):
            raise ValueError(f"duplicate reward functions: {self.functions}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.memory_mb < 64:
            raise ValueError(f"memory_mb must be >= 64, got {self.memory_mb}")
        if self.max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {self.max_chars}")
        if self.target_language not in LANGUAGES:
            raise ValueError(f"target_language={self.target_language!r}: expected one of {sorted(LANGUAGES)}")
        if not 0 <= self.overlong_buffer_tokens < self.overlong_max_tokens:
            raise ValueError("need 0 <= overlong_buffer_tokens < overlong_max_tokens")
        if not 0 < self.code_cpu_s <= self.code_wall_s:
            raise ValueError(f"need 0 < code_cpu_s <= code_wall_s, got {self.code_cpu_s}, {self.code_wall_s}")
        if self.code_memory_mb < 32 or self.code_max_procs < 1:
            raise ValueError("need code_memory_mb >= 32 and code_max_procs >= 1")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Completion sampling. ``top_k=0`` and ``top_p=1.0`` disable those filters; ``temperature=0`` is greedy."""

    temperature: float = 1.0  # R1: 1.0 (0.7 in the second RL stage)
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 1024
    stop_strings: tuple[str, ...] = ()  # decoding of a row stops after any of these (besides EOS)
    include_stop_str: bool = True  # keep the matched stop string in the completion (e.g. "</answer>")
    slots: int = 0  # decode slots (r1jax.rollout.SlotEngine), refilled as rows end; 0: one per row of a call
    prompt_chunk: int = 0  # prefill prompts in chunks of this many tokens; 0: a prompt in one forward
    # partial rollouts (Kimi k1.5): a GRPO step decodes this many steps and trains the groups complete by then
    # (oldest first, at most prompts_per_step); unfinished rows carry over, cache and all; 0 = off
    step_budget: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(not s for s in self.stop_strings):
            raise ValueError("stop strings must be non-empty")
        if min(self.slots, self.prompt_chunk, self.step_budget) < 0:
            raise ValueError("sampling.slots, prompt_chunk and step_budget must be >= 0")
        if self.step_budget and self.step_budget < self.prompt_chunk:
            raise ValueError(
                f"sampling.step_budget ({self.step_budget}) is below the prompt chunk ({self.prompt_chunk}): a step "
                "would not decode one chunk's worth of tokens"
            )


@dataclasses.dataclass(frozen=True)
class ToolConfig:
    """Multi-turn tool calling in rollouts (``r1jax.tool_rollout``; the tools and their tags: ``r1jax.tools``).

    With ``tools`` empty, rollouts are single-turn. Otherwise the sampler stops after a call's closing tag (e.g.
    ``</search>``), the tool runs on the host, its result block (e.g. ``<information>...</information>``) is appended
    as context (loss, KL and ratio mask 0), and decoding goes on, for at most ``max_turns`` calls per trajectory;
    past that, calls are plain text. The whole trajectory (model and result tokens) fits in the sampling budget
    ``sampling.max_new_tokens``; ``max_turn_tokens`` bounds the model tokens of one turn (0: the remaining budget),
    ``max_result_tokens`` / ``max_result_chars`` one result.
    """

    tools: tuple[str, ...] = ()  # names in r1jax.tools.TOOL_SYNTAX: "search", "python"
    corpus: str | None = None  # search: a .jsonl of {"id", "title", "text"}
    max_turns: int = 4  # tool calls executed per trajectory
    max_turn_tokens: int = 0  # model tokens per turn; a turn that runs over ends the trajectory (truncated)
    max_result_tokens: int = 256  # tokens of one result block (tags included); longer ones are cut
    max_result_chars: int = 2000  # characters of one result's text, cut before tokenising
    top_k: int = 3  # search: documents per query
    timeout_s: float = 30.0  # wall-clock limit of one call (the tools bound themselves too)
    num_threads: int = 8  # calls of one turn run concurrently on this many threads

    def __post_init__(self) -> None:
        object.__setattr__(self, "tools", tuple(self.tools))
        for name in self.tools:
            syntax_of(name)
        if len(set(self.tools)) != len(self.tools):
            raise ValueError(f"tools repeated: {self.tools}")
        if self.max_turns < 1 or self.top_k < 1 or self.num_threads < 1:
            raise ValueError("tools: max_turns, top_k and num_threads must be >= 1")
        if self.max_turn_tokens < 0:
            raise ValueError(f"tools.max_turn_tokens must be >= 0, got {self.max_turn_tokens}")
        if self.max_result_tokens < 1 or self.max_result_chars < 1:
            raise ValueError("tools: max_result_tokens and max_result_chars must be >= 1")
        if self.timeout_s <= 0:
            raise ValueError(f"tools.timeout_s must be > 0, got {self.timeout_s}")

    @property
    def enabled(self) -> bool:
        return bool(self.tools)


# --- training ---------------------------------------------------------------------------------------------------------
class LoraQuant(enum.StrEnum):
    NONE = "none"  # the frozen base in param_dtype
    INT8 = "int8"  # QLoRA: symmetric int8, one scale per output channel and input block
    NF4 = "nf4"  # QLoRA: 4-bit NormalFloat, one scale per output channel and input block


LORA_PROJECTIONS = ("q", "k", "v", "o", "q_a", "q_b", "kv_a", "kv_b", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on frozen projections (``r1jax.lora``); ``rank`` 0 trains every parameter instead.

    ``targets`` name projections (empty: all of them): attention ``q k v o`` (MLA: ``q_a q_b kv_a kv_b o``, or
    ``q`` without a q-LoRA rank) and MLP ``gate up down`` (dense layers and shared experts; the routed experts too
    with ``experts``). The update is ``alpha / rank * a @ b`` with ``b`` zero at the start, so training starts from
    the base exactly; there is no adapter dropout. ``quant`` stores the frozen base quantised (QLoRA) with
    ``quant_block`` input rows per scale. ``merge_for_sampling``: the sampler and the log-prob passes of a GRPO step
    read the adapters merged into the weights (one transient merged copy while they run; faster, since a decode step
    then makes one product per projection instead of three) or run them unmerged (no copy). None (the default):
    merged for a float base, unmerged for a quantised one, whose merged copy would be full precision.
    """

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = ()  # () = every projection the model has
    experts: bool = False
    quant: LoraQuant = LoraQuant.NONE
    quant_block: int = 64
    merge_for_sampling: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "quant", _as_enum(LoraQuant, self.quant, "lora.quant"))
        if self.rank < 0 or self.alpha <= 0 or self.quant_block < 1:
            raise ValueError("lora: rank must be >= 0, alpha > 0 and quant_block >= 1")
        unknown = sorted(set(self.targets) - set(LORA_PROJECTIONS))
        if unknown:
            raise ValueError(f"lora.targets: unknown {unknown}; valid: {', '.join(LORA_PROJECTIONS)}")
        if self.quant != LoraQuant.NONE and not self.rank:
            raise ValueError("lora.quant needs lora.rank > 0 (a quantised base is frozen)")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def merged_sampling(self) -> bool:
        """Whether GRPO's sampler and log-prob passes read the adapters merged (``merge_for_sampling`` resolved)."""
        if self.merge_for_sampling is None:
            return self.quant == LoraQuant.NONE
        return self.merge_for_sampling


@dataclasses.dataclass(frozen=True)
class MtpConfig:
    """The multi-token-prediction loss in SFT (DeepSeek-V3 section 2.2): the SFT loss plus lambda / D times the sum
    of the D = ``n_mtp_layers`` MTP depths' cross-entropies. V3 trains with lambda = 0.3 for its first 10T tokens and
    0.1 after: ``weight`` for the first ``switch_step`` optimiser steps, then ``late_weight`` (``switch_step`` 0:
    ``weight`` throughout). ``weight`` 0 turns it off (the default). It needs a model with its MTP module:
    ``n_mtp_layers`` > 0, and a checkpoint converted with ``--mtp`` (or a random start)."""

    weight: float = 0.0
    late_weight: float = 0.1
    switch_step: int = 0

    def __post_init__(self) -> None:
        if self.weight < 0 or self.late_weight < 0 or self.switch_step < 0:
            raise ValueError("mtp: weight, late_weight and switch_step must be >= 0")

    @property
    def enabled(self) -> bool:
        return self.weight > 0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup and cosine decay, global-norm clipping, and the MoE router-bias update.

    ``router_bias_gamma`` is the bias update speed of auxiliary-loss-free balancing (DeepSeek-V3 section 2.1.2,
    gamma = 0.001); the bias is updated outside the optimiser after every optimiser step and never gets gradients.
    """

    lr: float = 3e-6  # R1 RL stage
    warmup_steps: int = 0  # optimiser steps of linear warmup from 0
    decay_steps: int = 0  # optimiser steps of cosine decay after warmup; 0 = constant lr after warmup
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of lr
    b1: float = 0.9
    b2: float = 0.95  # DeepSeek-V3 pre-training
    eps: float = 1e-8
    weight_decay: float = 0.1  # decoupled; matrices only (not norms, biases or the router bias)
    max_grad_norm: float = 1.0  # global-norm clip; 0 disables
    router_bias_gamma: float = 0.001  # 0 disables the bias update
    moment_dtype: str = "float32"  # AdamW mu and nu storage (bfloat16 halves the optimiser state; math in f32)

    def __post_init__(self) -> None:
        if self.moment_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"moment_dtype must be float32 or bfloat16, got {self.moment_dtype!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ValueError("warmup_steps and decay_steps must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1) or self.eps <= 0:
            raise ValueError("need 0 <= b1, b2 < 1 and eps > 0")
        if self.weight_decay < 0 or self.max_grad_norm < 0 or self.router_bias_gamma < 0:
            raise ValueError("weight_decay, max_grad_norm and router_bias_gamma must be >= 0")


class Stage(enum.StrEnum):
    SFT = "sft"  # supervised fine-tuning / distillation on prompt + completion pairs
    GRPO = "grpo"  # reinforcement learning with group-relative advantages


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where prompts (GRPO) or prompt + completion pairs (SFT) come from (see ``r1jax.data.datasets``)."""

    name: str = "countdown"  # gsm8k | math | countdown | arithmetic | search_qa | humaneval | a jsonl/parquet path
    split: str = "train"
    source: str | None = None  # the file/directory for "math"
    data_dir: str | None = None  # TFDS data_dir for prepared datasets (None: TFDS's default)
    template: str = "r1_zero"  # r1_zero | chat | plain | a string with {prompt}
    system: str | None = None
    max_prompt_tokens: int = 512  # longer prompts are skipped and counted
    seq_len: int = 512  # SFT: packed row length
    options: str = ""  # generated datasets' options, e.g. "min_digits=1,max_digits=2,ops=+-" (arithmetic)

    def __post_init__(self) -> None:
        if self.max_prompt_tokens < 1 or self.seq_len < 2:
            raise ValueError("max_prompt_tokens must be >= 1 and seq_len >= 2")
        self.option_dict()

    def option_dict(self) -> dict[str, int | str]:
        """``options`` as keyword arguments: integers where the value is one."""
        out: dict[str, int | str] = {}
        for item in filter(None, (x.strip() for x in self.options.split(","))):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"data.options: expected key=value pairs separated by commas, got {item!r}")
            value = value.strip()
            out[key.strip()] = int(value) if value.lstrip("-").isdigit() else value
        return out


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation during training (``r1jax.evaluate``): every ``every`` steps, at the start and at the
    last step, on the first ``limit`` problems of ``data.name``'s ``split``; logged as ``eval/*`` metrics."""

    every: int = 0  # steps between evaluations; 0 = never
    split: str = "test"
    limit: int = 64  # problems
    k: int = 1  # samples per problem (pass@1 is their mean, maj@k their vote)
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 0  # 0 = the sampling length of the run
    batch_size: int = 16  # prompts per sampler call

    def __post_init__(self) -> None:
        if self.every < 0 or self.limit < 1 or self.k < 1 or self.batch_size < 1 or self.max_new_tokens < 0:
            raise ValueError("eval: every, max_new_tokens >= 0 and limit, k, batch_size >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("eval: temperature must be >= 0 and top_p in (0, 1]")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 50  # steps between checkpoints (and always at the last step and on SIGTERM)
    keep: int = 3  # newest checkpoints kept
    async_save: bool = True

    def __post_init__(self) -> None:
        if self.every < 1 or self.keep < 1:
            raise ValueError("checkpoint.every and checkpoint.keep must be >= 1")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One GRPO run: algorithm, sampling, rewards, optimiser, and the model when it is not read from a checkpoint.

    Batch arithmetic: every step samples ``grpo.prompts_per_step x grpo.group_size`` completions; each of the
    ``grpo.num_iterations`` passes over them makes ``grpo.num_minibatches`` optimiser steps, each accumulating
    gradients over micro-batches of ``micro_batch_size`` sequences (0 = the whole mini-batch at once).
    """

    grpo: GRPOConfig = GRPOConfig()
    sampling: SamplingConfig = SamplingConfig()
    rewards: RewardConfig = RewardConfig()
    optim: OptimConfig = OptimConfig()
    model: ModelConfig | None = None  # None: the checkpoint's own config
    micro_batch_size: int = 0  # sequences per gradient-accumulation micro-batch; 0 = whole mini-batch
    steps: int = 1000  # GRPO steps (one sampling phase each) or SFT optimiser steps
    seed: int = 0
    stage: Stage = Stage.GRPO
    init: str | None = None  # checkpoint to start from (HF dir, .gguf, r1jax checkpoint or run dir); None: random
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    tools: ToolConfig = ToolConfig()  # multi-turn tool calls in GRPO rollouts (and tool results masked in SFT)
    lora: LoraConfig = LoraConfig()  # rank 0: full fine-tuning
    mtp: MtpConfig = MtpConfig()  # SFT: the multi-token-prediction loss (off by default)
    sft_batch_size: int = 8  # SFT: examples per optimiser step (one row each unless sft_pack)
    sft_pack: int = 0  # SFT: > 0 packs each step's examples first-fit into rows, their count rounded up to this
    max_consecutive_skips: int = 5  # non-finite steps in a row before the run stops
    mesh: str = ""  # device mesh when ``r1jax train`` gets no --mesh, e.g. "fsdp=8" or "fsdp=16,tensor=8,expert=16"

    def __post_init__(self) -> None:
        object.__setattr__(self, "stage", _as_enum(Stage, self.stage, "stage"))
        if self.mtp.enabled and self.stage != Stage.SFT:
            raise ValueError("mtp.weight > 0 is an SFT loss: set stage=sft or mtp.weight=0")
        if self.max_consecutive_skips < 1 or self.sft_batch_size < 1:
            raise ValueError("max_consecutive_skips and sft_batch_size must be >= 1")
        if self.sft_pack < 0 or (self.sft_pack and self.micro_batch_size and self.sft_pack % self.micro_batch_size):
            raise ValueError(
                f"sft_pack={self.sft_pack} must be >= 0 and a multiple of micro_batch_size ({self.micro_batch_size}): "
                "a packed batch has a multiple of sft_pack rows"
            )
        if self.sampling.max_new_tokens != self.grpo.max_completion_len:
            raise ValueError(
                f"sampling.max_new_tokens ({self.sampling.max_new_tokens}) must equal grpo.max_completion_len "
                f"({self.grpo.max_completion_len}): the overlong filter and the Dr. GRPO normaliser read the latter"
            )
        if self.micro_batch_size < 0 or (self.micro_batch_size and self.grpo.minibatch_size % self.micro_batch_size):
            raise ValueError(
                f"micro_batch_size={self.micro_batch_size} must divide the mini-batch ({self.grpo.minibatch_size})"
            )
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.sampling.slots and self.sampling.slots < self.grpo.group_size:
            raise ValueError(
                f"sampling.slots ({self.sampling.slots}) is smaller than a group (grpo.group_size="
                f"{self.grpo.group_size}): the pool must hold a whole group at once"
            )
        if self.grpo.routing_replay and self.tools.enabled:
            raise ValueError("grpo.routing_replay records single-turn rollouts: it does not combine with tools")
        if self.sampling.step_budget and self.grpo.max_off_policy_steps:
            raise ValueError("partial rollouts (sampling.step_budget) and grpo.max_off_policy_steps are exclusive")
        if self.sampling.step_budget and (self.tools.enabled or self.grpo.dynamic_sampling):
            raise ValueError(
                "partial rollouts (sampling.step_budget) train complete groups in submission order: they do not "
                "combine with tool rollouts or dynamic sampling"
            )
        if self.tools.max_turn_tokens > self.sampling.max_new_tokens:
            raise ValueError(
                f"tools.max_turn_tokens ({self.tools.max_turn_tokens}) exceeds the trajectory budget "
                f"sampling.max_new_tokens ({self.sampling.max_new_tokens})"
            )

    @property
    def micro_batch(self) -> int:
        return self.micro_batch_size or self.grpo.minibatch_size

    @property
    def grad_accum_steps(self) -> int:
        return self.grpo.minibatch_size // self.micro_batch

    @property
    def optimizer_steps_per_step(self) -> int:
        return self.grpo.num_iterations * self.grpo.num_minibatches


def to_json(cfg) -> object:
    """A config (any of the dataclasses here, nested) as plain JSON values: enums by value, tuples as lists."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_json(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, enum.Enum):
        return cfg.value
    if isinstance(cfg, tuple):
        return [to_json(v) for v in cfg]
    return cfg
