"""r1jax side by side with what users would pick instead, on the CPU this runs on.

Every subcommand runs r1jax and the peer back to back in one invocation, each side in its own subprocess (so each
gets its own peak RSS), with the same thread count, model and sizes. Each prints one JSON line per comparison
(both timings, the ratio peer / r1jax, model-FLOP utilisation against a measured matmul peak, peak RSS) and a table.

    python tools/bench.py forward    # logits, batch 8 x 256: SmolLM2-135M (GGUF) and a tiny DeepSeek-V3 vs transformers
    python tools/bench.py generate   # 16 sequences x 128 new tokens, greedy, KV cache, vs transformers generate
    python tools/bench.py grpo       # one GRPO step (2 prompts x G=8, 64 new tokens, KL to a reference) vs TRL
    python tools/bench.py grpo --lora 16   # the same with rank-16 LoRA on every projection vs TRL + PEFT
    python tools/bench.py grpo --long-tail # 4 prompts x G=8, lognormal lengths: 8 refilled slots vs TRL's padding
    python tools/bench.py sft        # SFT step tokens/s on packed 8 x 256 rows vs a plain torch AdamW step
    python tools/bench.py rollout    # long-tail lengths: the slot engine (and partial rollouts) vs static batches
    python tools/bench.py all        # everything, one command
    python tools/bench.py all --small   # tiny sizes: a smoke test of the harness

FLOP accounting: 2 x (active parameters) x tokens for a forward (6x for a training step), plus attention
2 x layers x heads x (d_qk + d_v) x t x s per sequence, PaLM convention (no causal halving); the tied SmolLM2
embedding counts once, as the output head. For MoE only the routed experts a token visits count. The peak is a
jitted f32 jnp matmul (2048^3) measured in the same run; ``mfu`` = achieved FLOP/s / that peak.

JAX's persistent compilation cache is on (``--jax-cache``, default ``.cache/jax``); the GRPO comparison reruns the
r1jax side in a fresh process to show the first step with a warm cache.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time

from peak_rss import own_peak_rss

ROOT = pathlib.Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"
PROMPTS = ["What is the capital of France?", "Write a short poem about the sea."]


# --- shared helpers --------------------------------------------------------------------------------------------------
def require(*modules: str) -> None:
    """Stop in one line, before any side runs, when a peer's package is missing."""
    import importlib.util

    missing = sorted({m for m in modules if importlib.util.find_spec(m) is None})
    if missing:
        raise SystemExit(f"bench: missing {', '.join(missing)}; install the peers with pip install -e '.[bench]'")


def smollm2_gguf() -> str:
    from r1jax.configs.smollm2 import smollm2_gguf as gguf_path

    from r1jax.errors import ConfigError

    try:
        return gguf_path()
    except ConfigError as e:
        raise SystemExit(str(e)) from None


def tiny_v3_config(small: bool) -> dict:
    """A small DeepSeek-V3 (MLA + MoE with a shared expert, group-limited sigmoid routing, one dense layer)."""
    return dict(
        vocab_size=4096,
        hidden_size=128 if small else 256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=2 if small else 4,
        first_k_dense_replace=1,
        num_attention_heads=8,
        num_key_value_heads=8,
        q_lora_rank=96,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def build_tiny_v3(small: bool) -> str:
    """Save a random tiny DeepseekV3ForCausalLM with transformers' own class (once per size) and return its dir."""
    out = CACHE / "bench" / ("tiny_v3_small" if small else "tiny_v3")
    if (out / "config.json").exists():
        return str(out)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("deepseek_v3", **tiny_v3_config(small))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    return str(out)


def model_path(name: str, small: bool) -> str:
    return smollm2_gguf() if name == "smollm2" else build_tiny_v3(small)


def hf_load(name: str, path: str):
    import torch
    from transformers import AutoModelForCausalLM

    if name == "smollm2":
        d, f = os.path.split(path)
        return AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def smollm2_hf_dir() -> str:
    """SmolLM2 from the GGUF, saved once as a plain float32 HuggingFace directory: what a TRL user starts from (the
    Trainer refuses models that carry a GGUF quantizer, although transformers dequantises GGUF to float32)."""
    out = CACHE / "bench" / "smollm2_hf"
    if (out / "config.json").exists():
        return str(out)
    path = smollm2_gguf()
    model = hf_load("smollm2", path)
    model.hf_quantizer = None
    model.is_quantized = False
    del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    hf_tokenizer(path).save_pretrained(str(out))
    return str(out)


def hf_tokenizer(path: str):
    from transformers import AutoTokenizer

    d, f = os.path.split(path)
    return AutoTokenizer.from_pretrained(d, gguf_file=f)


def peak_rss_mb() -> float:
    return own_peak_rss() / 2**20


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def setup_jax(args):
    import jax

    jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(args.jax_cache).resolve()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return jax


def setup_torch(args):
    import torch

    torch.set_num_threads(args.threads)
    return torch


def model_stats(model) -> dict:
    """Active parameters (MoE: shared + top-k of the routed experts) and the attention shape, from an r1jax model."""
    import jax
    import numpy as np

    cfg = model.cfg
    active = 0
    for path, x in jax.tree_util.tree_flatten_with_path(model.param_dict())[0]:
        names = [str(getattr(k, "key", k)) for k in path]
        size = int(np.prod(x.shape))
        if "experts" in names and cfg.n_experts:
            size = size * cfg.experts_per_token // cfg.n_experts
        if names[0] == "embed" and not cfg.tie_embeddings:
            continue  # a lookup, not a matmul (the separate lm_head counts)
        active += size
    if cfg.is_mla:
        d_qk, d_v = cfg.qk_nope_dim + cfg.qk_rope_dim, cfg.v_head_dim
    else:
        d_qk = d_v = cfg.head_size
    return {"params": active, "layers": cfg.n_layers, "heads": cfg.n_heads, "d_qk": d_qk, "d_v": d_v}


def fwd_flops(st: dict, batch: int, t: int, s: int | None = None) -> float:
    """Forward FLOPs of ``batch`` sequences of ``t`` new tokens attending to ``s`` keys (default t)."""
    s = t if s is None else s
    attn = 2 * st["layers"] * st["heads"] * (st["d_qk"] + st["d_v"]) * t * s
    return batch * (2 * st["params"] * t + attn)


def decode_flops(st: dict, batch: int, prompt: int, new: int, prefill_rows: int | None = None) -> float:
    """Prefill (``prefill_rows`` prompts, default ``batch``) then ``new - 1`` single-token steps of ``batch`` rows."""
    first = fwd_flops(st, batch if prefill_rows is None else prefill_rows, prompt)
    return first + sum(fwd_flops(st, batch, 1, prompt + i + 1) for i in range(new - 1))


def logprob_flops(st: dict, rows: int, prompt: int, new: int, groups: int | None = None) -> float:
    """Teacher-forced log-probs of ``new`` completion tokens after a ``prompt``-token prompt: the layers over every
    position, the output head over the completion positions only. ``groups``: each group's prompt runs once and
    its rows' completions attend to it (``GRPOConfig.shared_prompt``)."""
    body = dict(st, params=st["params"] - st["head"])
    head = 2 * st["head"] * rows * new
    if groups is None:
        return fwd_flops(body, rows, prompt + new) + head
    return fwd_flops(body, groups, prompt) + fwd_flops(body, rows, new, prompt + new) + head


# --- the sides (each runs in its own process) ------------------------------------------------------------------------
def side_peak(args) -> dict:
    jax = setup_jax(args)
    import jax.numpy as jnp

    n = 512 if args.small else 2048
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    ts = timed(lambda: f(a, b).block_until_ready(), 8)
    return {"n": n, "seconds": min(ts), "flops_per_s": 2 * n**3 / min(ts)}


def _tokens(vocab: int, b: int, t: int, seed: int = 0):
    import numpy as np

    return np.random.default_rng(seed).integers(3, min(vocab, 32000), (b, t), dtype=np.int32)


def side_forward(args, impl: str, name: str) -> dict:
    b, t = (2, 64) if args.small else (8, 256)
    path = model_path(name, args.small)
    if impl == "r1jax":
        jax = setup_jax(args)
        import r1jax
        from r1jax.model import forward

        model = r1jax.load(path)
        cfg, params = model.cfg, model.param_dict()
        tokens = jax.numpy.asarray(_tokens(cfg.vocab_size, b, t))
        f = jax.jit(lambda p, x: forward(p, x, cfg)[0])
        t0 = time.perf_counter()
        f(params, tokens).block_until_ready()
        first = time.perf_counter() - t0
        ts = timed(lambda: f(params, tokens).block_until_ready(), args.reps)
        return {"first_s": first, "times": ts, "stats": model_stats(model), "batch": b, "t": t}
    torch = setup_torch(args)
    model = hf_load(name, path)
    tokens = torch.as_tensor(_tokens(model.config.vocab_size, b, t), dtype=torch.long)

    def run():
        with torch.inference_mode():
            return model(tokens).logits

    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    return {"first_s": first, "times": timed(run, args.reps), "batch": b, "t": t}


def side_generate(args, impl: str) -> dict:
    b, plen, new = (4, 32, 16) if args.small else (16, 32, 128)
    path = smollm2_gguf()
    prompts = _tokens(49152, b, plen, seed=1)
    if impl == "r1jax":
        setup_jax(args)
        import r1jax

        model = r1jax.load(path)

        def run():
            return r1jax.generate(model, prompts.tolist(), max_new_tokens=new, stop_ids=[])

        t0 = time.perf_counter()
        out = run()
        first = time.perf_counter() - t0
        ts = timed(run, args.reps)
        assert all(len(o) == new for o in out)
        st = model_stats(model)
        return {"first_s": first, "times": ts, "stats": st, "out": [list(map(int, o)) for o in out]}
    torch = setup_torch(args)
    model = hf_load("smollm2", path)
    ids = torch.as_tensor(prompts, dtype=torch.long)

    def run():
        with torch.inference_mode():
            return model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )[:, plen:]

    t0 = time.perf_counter()
    out = run()
    first = time.perf_counter() - t0
    ts = timed(run, args.reps)
    assert out.shape == (b, new), out.shape
    return {"first_s": first, "times": ts, "out": out.tolist()}


def reward(text: str) -> float:
    """A simple Python reward, identical on both sides: distinct words, bonus for mentioning Paris."""
    return min(len(set(text.split())), 40) / 40.0 + (1.0 if "Paris" in text else 0.0)


LONG_TAIL_PROMPTS = PROMPTS + ["Name three rivers in Europe.", "Explain what a prime number is."]
LONG_TAIL_SLOTS = 8


def grpo_shape(args) -> tuple[int, int, int, list[str], list[int] | None]:
    """(G, prompts, T, prompt texts, per-row budgets or None). ``--long-tail``: 4 prompts x G=8 rows whose lengths
    are lognormal budgets (mean T/4, at most T), each row ending with EOS at its budget on both sides."""
    G, n_prompts, T = (4, 2, 8) if args.small else (8, 2, 64)
    if not args.long_tail:
        return G, n_prompts, T, PROMPTS, None
    budgets = long_tail_budgets(4 * G, T // 4, T, seed=2)
    assert max(budgets) >= 4 * sum(budgets) / len(budgets), "the budgets' tail is too short"
    return G, 4, T, LONG_TAIL_PROMPTS, budgets


def side_grpo(args, impl: str) -> dict:
    G, n_prompts, T, texts, budgets = grpo_shape(args)
    path = smollm2_gguf()
    steps = args.grpo_steps
    if impl == "r1jax":
        jax = setup_jax(args)
        import json as _json

        import numpy as np

        import r1jax
        from r1jax import grpo, lora, rollout
        from r1jax.config import GRPOConfig, LoraConfig, OptimConfig, RewardConfig, SamplingConfig, TrainConfig
        from r1jax.data.tokenizer import Tokenizer

        model = r1jax.load(path)
        files = dict(model.tokenizer_files)
        tok = Tokenizer(files["tokenizer.json"], _json.loads(files["tokenizer_config.json"]))
        cfg = TrainConfig(
            grpo=GRPOConfig(
                group_size=G, prompts_per_step=n_prompts, max_completion_len=T, kl_coef=0.04, shared_prompt=True
            ),
            sampling=SamplingConfig(temperature=1.0, max_new_tokens=T, slots=LONG_TAIL_SLOTS if budgets else 0),
            rewards=RewardConfig(num_workers=0),
            optim=OptimConfig(lr=1e-6, weight_decay=0.0, b2=0.999),
            lora=LoraConfig(
                rank=args.lora, alpha=2.0 * args.lora, merge_for_sampling=False if args.lora_unmerged else None
            )
            if args.lora
            else LoraConfig(),
        )

        def reward_fn(ro, metas):
            texts = rollout.completion_texts(ro, tok.decode)
            return np.array([reward(s) for s in texts], np.float32), {}

        # no stop tokens: every completion is T tokens on both sides, so both do the same work
        # remat keeping the projection outputs: recomputing norms and activations is cheaper on CPU than saving them
        mcfg = model.cfg.replace(remat=True, remat_policy="dots")
        trainer = grpo.GRPOTrainer(cfg, mcfg, reward_fn, stop_ids=[], prompt_bucket=16,
                                   budgets=None if budgets is None else lambda prompts: budgets)  # fmt: skip
        prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}])) for p in texts]
        params = model.param_dict()
        if args.lora:  # every attention and MLP projection, as the peer's target_modules
            params = lora.attach(params, cfg.lora, mcfg, jax.random.key(1))
        state = trainer.init_state(params)
        del model, params
        times, phases = [], []
        key = jax.random.key(0)
        for i in range(steps):
            t0 = time.perf_counter()
            state, m = trainer.grpo_step(state, prompts, [{}] * n_prompts, jax.random.fold_in(key, i))
            jax.block_until_ready(state.params)
            times.append(time.perf_counter() - t0)
            phases.append({k[5:]: m[k] for k in m if k.startswith("perf/") and k.endswith("_s") and "per_s" not in k})
        plen = -(-max(len(p) for p in prompts) // 16) * 16
        peer_plen = max(len(p) for p in prompts)
        out = {"times": times, "phases": phases, "prompt_len": plen, "prompt_len_peer": peer_plen, "completion_len": T}
        return dict(out, rows=G * n_prompts, groups=n_prompts)
    torch = setup_torch(args)
    import datasets
    import transformers
    from trl import GRPOConfig, GRPOTrainer

    transformers.logging.set_verbosity_error()
    model_dir = smollm2_hf_dir()
    ds = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in texts])

    def reward_fn(completions, **kw):
        return [reward(c[0]["content"] if isinstance(c, list) else c) for c in completions]

    times: list[float] = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, a, s, c, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, s, c, **kw):
            times.append(time.perf_counter() - self.t0)

    out_dir = CACHE / "bench" / "trl_out"
    conf = GRPOConfig(
        output_dir=str(out_dir),
        num_generations=G,
        per_device_train_batch_size=G * n_prompts,
        gradient_accumulation_steps=1,
        max_completion_length=T,
        beta=0.04,
        loss_type="grpo",
        temperature=1.0,
        learning_rate=1e-6,
        max_steps=steps,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1000,
        gradient_checkpointing=False,
        # no early EOS: T tokens per completion (or each row's budget), as on the r1jax side
        generation_kwargs={} if budgets else {"min_new_tokens": T},
        seed=0,
        disable_tqdm=True,
        model_init_kwargs={"dtype": torch.float32},
    )
    peft_config = None
    if args.lora:  # the same adapters: every attention and MLP projection, alpha = 2 x rank, no dropout
        from peft import LoraConfig

        modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        peft_config = LoraConfig(r=args.lora, lora_alpha=2 * args.lora, lora_dropout=0.0, target_modules=modules,
                                 task_type="CAUSAL_LM")  # fmt: skip
    trainer = GRPOTrainer(model=model_dir, reward_funcs=reward_fn, args=conf, train_dataset=ds, callbacks=[Timer()],
                          peft_config=peft_config)  # fmt: skip
    if budgets:
        force_eos_at(trainer.model, budgets, trainer.processing_class.eos_token_id)
    trainer.train()
    return {"times": times}


def force_eos_at(model, budgets: list[int], eos: int) -> None:
    """Make ``model.generate`` end row i with EOS exactly at its ``budgets[i]``-th new token (EOS barred before):
    the long-tail lengths on the transformers side, whose generate runs until its longest row ends."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class AtBudget(LogitsProcessor):
        def __init__(self, prompt_len: int):
            self.prompt_len = prompt_len

        def __call__(self, input_ids, scores):
            step = input_ids.shape[1] - self.prompt_len
            b = torch.as_tensor(budgets[: scores.shape[0]])
            scores[step < b - 1, eos] = -float("inf")
            scores[step >= b - 1] = torch.where(torch.arange(scores.shape[1]) == eos, 0.0, -float("inf"))
            return scores

    generate = model.generate

    def with_budgets(*a, **kw):
        ids = kw.get("input_ids", a[0] if a else None)
        return generate(*a, logits_processor=LogitsProcessorList([AtBudget(ids.shape[1])]), **kw)

    model.generate = with_budgets


def side_sft(args, impl: str) -> dict:
    b, t = (2, 64) if args.small else (8, 256)
    path = smollm2_gguf()
    rows = _tokens(49152, b, t + 1, seed=2)
    steps = args.sft_steps
    if impl == "r1jax":
        jax = setup_jax(args)
        import numpy as np

        import r1jax
        from r1jax import sft
        from r1jax.config import OptimConfig
        from r1jax.optim import make_optimizer

        model = r1jax.load(path)
        cfg = model.cfg
        # two examples per row, each a 16-token prompt and a completion: loss on completion tokens
        half = t // 2
        examples = [(r[i * half : i * half + 16], r[i * half + 16 : (i + 1) * half + 1]) for r in rows for i in (0, 1)]
        batch = sft.pack_examples(examples, t, num_rows=b)
        assert batch["tokens"].shape == (b, t) and (batch["segment_ids"] > 0).all()
        batch = {k: jax.numpy.asarray(v) for k, v in batch.items()}
        opt = make_optimizer(OptimConfig(lr=1e-5, weight_decay=0.0, b2=0.999))
        params = model.param_dict()
        opt_state = jax.jit(opt.init)(params)
        del model
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            params, opt_state, m = sft.sft_step(params, opt_state, batch, cfg=cfg, optimizer=opt)
            float(m["loss"])
            times.append(time.perf_counter() - t0)
        assert np.isfinite(float(m["loss"]))
        return {"times": times, "tokens": b * t}
    torch = setup_torch(args)
    model = hf_load("smollm2", path).train()
    x = torch.as_tensor(rows, dtype=torch.long)
    inputs, targets = x[:, :-1], x[:, 1:]
    mask = torch.ones_like(targets, dtype=torch.float32)
    mask[:, :15] = 0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = model(inputs).logits
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        loss = (nll * mask.flatten()).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        float(loss)
        times.append(time.perf_counter() - t0)
    return {"times": times, "tokens": b * t}


def long_tail_budgets(n: int, mean: int, cap: int, seed: int) -> list[int]:
    """``n`` per-row token budgets from a lognormal (sigma 1.25), scaled to ``mean`` and clipped to [1, ``cap``]: the
    long tail of reasoning lengths (max / mean >= 4 is checked by the caller)."""
    import numpy as np

    x = np.random.default_rng(seed).lognormal(0.0, 1.25, n)
    return [int(b) for b in np.clip(np.round(x / x.mean() * mean), 1, cap)]


ROLLOUT_MODES = ("static", "slots", "partial")


def side_rollout(args, name: str) -> dict:
    """Sample ``steps`` GRPO-like batches (``n`` rows each, G per prompt) with per-row budgets, EOS disabled, in the
    three modes: static batches of S rows (each costs its longest row), S slots refilled as rows end (each step
    drains), and slots with partial rollouts (a step decodes a fixed budget; unfinished rows carry over)."""
    jax = setup_jax(args)
    import numpy as np

    import r1jax
    from r1jax.config import SamplingConfig
    from r1jax.rollout import SlotEngine

    S, G, steps = (4, 2, 2) if args.small else (8, 4, 2)
    n, mean, cap, plen = (4 * S, 8, 40, 16) if args.small else (8 * S, 32, 256, 32)
    model = r1jax.load(model_path(name, args.small))
    cfg, params = model.cfg, model.param_dict()
    rng = np.random.default_rng(7)
    batches = [
        ([rng.integers(3, min(cfg.vocab_size, 32000), plen).tolist() for _ in range(n // G)],
         long_tail_budgets(n, mean, cap, seed=2 + s))
        for s in range(steps)
    ]  # fmt: skip
    assert all(max(b) >= 4 * sum(b) / len(b) for _, b in batches), "the budgets' tail is too short"
    useful = sum(sum(b) for _, b in batches)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=cap)
    per_step = -(-useful // (steps * S))  # the partial-rollout decode budget: a step's share of the work over S

    def run(mode: str) -> dict:
        engine = SlotEngine(cfg, sampling, slots=S, prompt_len=plen, stop_ids=[], prefill_batch=S // G,
                            refill=mode != "static")  # fmt: skip
        t0 = time.perf_counter()
        for i, (prompts, budgets) in enumerate(batches):
            for j, p in enumerate(prompts):
                engine.submit(p, G, jax.random.key(1000 * i + j), budgets[j * G : (j + 1) * G])
            engine.run(params, max_steps=per_step if mode == "partial" else None)
        engine.run(params)  # what partial rollouts left in flight
        wall = time.perf_counter() - t0
        got = sum(len(f.tokens) for f in engine.finished.values())
        assert got == useful, (mode, got, useful)
        return {"wall_s": wall, "decode_steps": engine.decode_steps}

    run("slots")  # compile (all modes share the shapes)
    out = {m: run(m) for m in ROLLOUT_MODES}
    return {"modes": out, "useful_tokens": useful, "slots": S, "samples_per_step": n, "steps": steps,
            "budget_mean": useful / (steps * n), "budget_max": max(max(b) for _, b in batches),
            "partial_budget": per_step, "model": name}  # fmt: skip


def run_side(args) -> dict:
    bench, impl, *rest = args.side
    if bench in ("grpo", "sft") and impl not in ("transformers", "trl", "torch"):  # as `r1jax train` runs them
        from r1jax.host_memory import retain_host_memory

        retain_host_memory()
    t0 = time.perf_counter()
    if bench == "peak":
        out = side_peak(args)
    elif bench == "forward":
        out = side_forward(args, impl, rest[0])
    elif bench == "generate":
        out = side_generate(args, impl)
    elif bench == "grpo":
        out = side_grpo(args, impl)
    elif bench == "sft":
        out = side_sft(args, impl)
    elif bench == "rollout":
        out = side_rollout(args, impl)
    else:
        raise SystemExit(f"unknown side {args.side}")
    out["peak_rss_mb"] = peak_rss_mb()
    out["wall_s"] = time.perf_counter() - t0
    return out


# --- the driver ------------------------------------------------------------------------------------------------------
def spawn(args, *side: str, extra: tuple[str, ...] = ()) -> dict:
    cmd = [sys.executable, __file__, "_side", *side, "--threads", str(args.threads), "--jax-cache", args.jax_cache]
    cmd += ["--reps", str(args.reps), "--grpo-steps", str(args.grpo_steps), "--sft-steps", str(args.sft_steps)]
    if args.small:
        cmd.append("--small")
    if args.lora:
        cmd += ["--lora", str(args.lora)]
    if args.long_tail:
        cmd.append("--long-tail")
    cmd += list(extra)
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"{' '.join(side)} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT ") :])


def steady(times: list[float], skip: int = 1) -> float:
    return statistics.median(times[skip:] if len(times) > skip else times)


class Driver:
    def __init__(self, args):
        self.args = args
        self.rows: list[dict] = []
        self._peak = None

    @property
    def peak(self) -> float:
        if self._peak is None:
            self._peak = spawn(self.args, "peak", "jax")["flops_per_s"]
        return self._peak

    def fresh_peak(self) -> None:
        """Measure the matmul peak again before each comparison (the load on a shared machine drifts)."""
        self._peak = None

    def emit(self, row: dict) -> None:
        row = {
            "load1": round(os.getloadavg()[0], 2),
            "threads": self.args.threads,
            "peak_gflops": round(self.peak / 1e9, 1),
            **row,
        }
        print(json.dumps(row), flush=True)
        self.rows.append(row)
        if self.args.json:
            with open(self.args.json, "a") as f:
                f.write(json.dumps(row) + "\n")

    def compare(self, name, metric, ours, theirs, *, flops=None, higher_better=False, **extra):
        """``ours`` / ``theirs``: (value, side result). Ratio = how many times r1jax beats the peer."""
        (v_o, r_o), (v_t, r_t) = ours, theirs
        ratio = v_o / v_t if higher_better else v_t / v_o
        row = {"bench": name, "metric": metric, "r1jax": round(v_o, 4), "peer": round(v_t, 4), "ratio": round(ratio, 2)}
        if flops is not None:  # FLOPs per call (value in seconds) or per unit of the value (a rate); or a pair
            f_o, f_t = flops if isinstance(flops, tuple) else (flops, flops)
            rate_o, rate_t = (f_o * v_o, f_t * v_t) if higher_better else (f_o / v_o, f_t / v_t)
            row["mfu_r1jax"] = round(rate_o / self.peak, 3)
            row["mfu_peer"] = round(rate_t / self.peak, 3)
        row["rss_mb_r1jax"], row["rss_mb_peer"] = round(r_o["peak_rss_mb"]), round(r_t["peak_rss_mb"])
        row.update(extra)
        self.emit(row)

    def forward(self):
        for name in ("smollm2", "tiny_v3"):
            model_path(name, self.args.small)  # build once, outside the timed processes
            o = spawn(self.args, "forward", "r1jax", name)
            t = spawn(self.args, "forward", "transformers", name)
            flops = fwd_flops(o["stats"], o["batch"], o["t"])
            self.compare(
                f"forward/{name}",
                "s/batch",
                (steady(o["times"], 0), o),
                (steady(t["times"], 0), t),
                flops=flops,
                peer_impl="transformers",
                first_s_r1jax=round(o["first_s"], 2),
            )

    def generate(self):
        o = spawn(self.args, "generate", "r1jax")
        t = spawn(self.args, "generate", "transformers")
        b, plen, new = (4, 32, 16) if self.args.small else (16, 32, 128)
        same = sum(x == y for a, c in zip(o["out"], t["out"], strict=True) for x, y in zip(a, c, strict=True))
        self.compare(
            "generate/smollm2",
            "s/call",
            (steady(o["times"], 0), o),
            (steady(t["times"], 0), t),
            flops=decode_flops(o["stats"], b, plen, new),
            peer_impl="transformers",
            new_tokens_per_s_r1jax=round(b * new / steady(o["times"], 0), 1),
            greedy_token_agreement=round(same / (b * new), 3),
            first_s_r1jax=round(o["first_s"], 2),
        )

    def grpo(self):
        require("trl", "datasets", *(("peft",) if self.args.lora else ()))
        cache = pathlib.Path(self.args.jax_cache)
        smollm2_hf_dir()  # convert once, outside the timed processes
        before = len(list(cache.glob("*"))) if cache.exists() else 0
        o = spawn(self.args, "grpo", "r1jax")
        mid = len(list(cache.glob("*")))
        warm = spawn(self.args, "grpo", "r1jax")
        after = len(list(cache.glob("*")))
        t = spawn(self.args, "grpo", "trl")
        unmerged = full = None
        if self.args.lora:  # the adapters unmerged in sampling and log-probs, and full fine-tuning, in the same run
            unmerged = spawn(self.args, "grpo", "r1jax", extra=("--lora-unmerged",))
            full = spawn(self.args, "grpo", "r1jax", extra=("--lora", "0"))
        st = self._smollm2_stats()
        rows, plen, T, groups = o["rows"], o["prompt_len"], o["completion_len"], o["groups"]
        # FLOPs each side executes: r1jax prefills each prompt once and, with shared_prompt, runs it once per group
        # in the log-prob passes too; TRL runs every row's prompt (and pads prompts to the longest, not a bucket)
        ours = decode_flops(st, rows, plen, T, prefill_rows=groups) + 4 * logprob_flops(st, rows, plen, T, groups)
        update = 3 * logprob_flops(st, rows, plen, T, groups)
        theirs = decode_flops(st, rows, o["prompt_len_peer"], T) + 4 * logprob_flops(st, rows, o["prompt_len_peer"], T)
        last = o["phases"][1:] or o["phases"]
        upd_s = statistics.median(p["update_s"] for p in last)
        phases = {k: round(statistics.median(p[k] for p in last), 3) for k in last[0]}
        if self.args.lora or self.args.long_tail:  # frozen weights get no gradient / rows of their own lengths:
            ours = theirs = update = None  # no like-for-like FLOP count
        self.compare(
            "grpo/smollm2-instruct"
            + (f"-lora{self.args.lora}" if self.args.lora else "")
            + ("-longtail" if self.args.long_tail else ""),
            "s/step",
            (steady(o["times"]), o),
            (steady(t["times"]), t),
            flops=None if ours is None else (ours, theirs),
            peer_impl=f"trl GRPOTrainer {self._version('trl')}",
            first_step_s_r1jax=round(o["times"][0], 2),
            first_step_s_r1jax_warm_cache=round(warm["times"][0], 2),
            first_step_s_peer=round(t["times"][0], 2),
            jax_cache_entries=[before, mid, after],
            phases_r1jax=phases,
            update_mfu_r1jax=None if update is None else round(update / upd_s / self.peak, 3),
            **({} if unmerged is None else self._lora_extra(unmerged, full)),
        )

    @staticmethod
    def _lora_extra(unmerged: dict, full: dict) -> dict:
        """The LoRA run (the default: adapters merged for the sampler and the log-prob passes) against the same with
        them unmerged (``lora.merge_for_sampling=false``), and against full fine-tuning, in the same invocation."""

        def phase(side, name):
            return round(statistics.median(p[name] for p in side["phases"][1:] or side["phases"]), 3)

        return {
            "step_s_unmerged": round(steady(unmerged["times"]), 3),
            "sample_s_unmerged": phase(unmerged, "sample_s"),
            "logprob_s_unmerged": phase(unmerged, "logprob_s"),
            "step_s_full_ft": round(steady(full["times"]), 3),
            "update_s_full_ft": phase(full, "update_s"),
            "rss_mb_full_ft": round(full["peak_rss_mb"]),
            "rss_mb_unmerged": round(unmerged["peak_rss_mb"]),
        }

    def sft(self):
        o = spawn(self.args, "sft", "r1jax")
        t = spawn(self.args, "sft", "torch")
        st = self._smollm2_stats()
        b, tl = (2, 64) if self.args.small else (8, 256)
        tok = o["tokens"]
        flops = 3 * fwd_flops(st, b, tl) / tok  # per token
        self.compare(
            "sft/smollm2",
            "tokens/s",
            (tok / steady(o["times"]), o),
            (tok / steady(t["times"]), t),
            flops=flops,
            higher_better=True,
            peer_impl="torch AdamW step",
            first_step_s_r1jax=round(o["times"][0], 2),
        )

    def rollout(self):
        """Useful tokens/s of the three sampling modes, each row's length its own budget (EOS off): static batches
        (the peer: a batch costs its longest row, as in TRL / transformers generate) against the slot engine."""
        for name in ("smollm2", "tiny_v3"):
            model_path(name, self.args.small)
            o = spawn(self.args, "rollout", name)
            modes, useful = o["modes"], o["useful_tokens"]
            rate = {m: useful / r["wall_s"] for m, r in modes.items()}
            for m in ("slots", "partial"):
                self.compare(
                    f"rollout/{name}-{m}",
                    "tok/s",
                    (rate[m], o),
                    (rate["static"], o),
                    higher_better=True,
                    peer_impl="r1jax static batches (same S, same loop)",
                    slots=o["slots"],
                    samples=o["samples_per_step"] * o["steps"],
                    budget_mean=round(o["budget_mean"], 1),
                    budget_max=o["budget_max"],
                    decode_steps_per_useful_token=round(modes[m]["decode_steps"] / useful, 4),
                    decode_steps_per_useful_token_static=round(modes["static"]["decode_steps"] / useful, 4),
                    partial_step_budget=o["partial_budget"],
                )

    def _smollm2_stats(self) -> dict:
        # SmolLM2-135M: 30 layers, 9 heads of 64, 134.5M parameters with the tied embedding counted once
        return {"params": 134_515_008, "head": 49152 * 576, "layers": 30, "heads": 9, "d_qk": 64, "d_v": 64}

    @staticmethod
    def _version(pkg: str) -> str:
        from importlib.metadata import version

        return version(pkg)

    def table(self) -> None:
        head = f"{'bench':24} {'metric':9} {'r1jax':>10} {'peer':>10} {'ratio':>6} {'mfu r1jax':>9} {'mfu peer':>9}"
        print("\n" + head + f" {'rss MB r1jax/peer':>18}")
        print("-" * (len(head) + 19))
        for r in self.rows:
            mfu_o, mfu_t = r.get("mfu_r1jax", ""), r.get("mfu_peer", "")
            rss = f"{r['rss_mb_r1jax']}/{r['rss_mb_peer']}"
            print(
                f"{r['bench']:24} {r['metric']:9} {r['r1jax']:>10.4g} {r['peer']:>10.4g} {r['ratio']:>5.2f}x"
                f" {mfu_o:>9} {mfu_t:>9} {rss:>18}"
            )
        if self.rows:
            r = self.rows[0]
            peaks = ", ".join(f"{r['peak_gflops']:g}" for r in self.rows)
            loads = ", ".join(f"{r['load1']:g}" for r in self.rows)
            print(f"(ratio: times r1jax is faster; f32 matmul peak per row {peaks} GFLOP/s; 1-min load {loads})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["forward", "generate", "grpo", "sft", "rollout", "all", "_side"])
    p.add_argument("side", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--small", action="store_true", help="tiny sizes (harness smoke test)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads (XLA uses all cores)")
    p.add_argument("--jax-cache", default=str(CACHE / "jax"), help="JAX persistent compilation cache directory")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions after warm-up (forward, generate)")
    p.add_argument("--grpo-steps", type=int, default=3)
    p.add_argument("--sft-steps", type=int, default=3)
    p.add_argument("--lora", type=int, default=0, help="grpo: LoRA of this rank on every projection, both sides")
    p.add_argument("--lora-unmerged", action="store_true", help=argparse.SUPPRESS)  # r1jax side: unmerged adapters
    p.add_argument("--long-tail", action="store_true",
                   help="grpo: 4 prompts x G=8 rows with lognormal lengths; r1jax on 8 refilled slots")  # fmt: skip
    p.add_argument("--cold-cache", action="store_true", help="empty the JAX compilation cache first")
    p.add_argument("--json", help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    if args.command == "_side":
        print("RESULT " + json.dumps(run_side(args)), flush=True)
        return
    if args.cold_cache:
        shutil.rmtree(args.jax_cache, ignore_errors=True)
    d = Driver(args)
    for name in ["forward", "generate", "grpo", "sft", "rollout"] if args.command == "all" else [args.command]:
        d.fresh_peak()
        getattr(d, name)()
    d.table()


if __name__ == "__main__":
    main()
