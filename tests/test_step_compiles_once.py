"""A training step compiles once: the state ``init`` returns is placed as the step returns it (committed to the
device), so the second step reuses the first step's programs instead of compiling them again. The base comes
committed, as a loaded checkpoint does; fresh adapters and optimiser moments do not, until a step returns them."""

import dataclasses

import jax
import numpy as np
import pytest

import configs
from r1jax import grpo, sft, train
from r1jax.config import DataConfig, LoraConfig, ModelConfig, OptimConfig, TrainConfig
from r1jax.data.tokenizer import ByteTokenizer
from r1jax.model import Transformer, init_params

DENSE = ModelConfig(arch="qwen2", vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffw=48)
PROMPTS = [[2, 3, 4], [7, 8], [9, 10, 11, 12], [13]]


def _loaded(cfg: ModelConfig) -> Transformer:
    """A model whose weights are on the device, committed, as ``r1jax.load`` places a checkpoint's."""
    return Transformer(cfg, jax.device_put(init_params(cfg, jax.random.key(0)), jax.devices()[0]))


def _reward(ro, metadata):
    return np.asarray(ro.tokens)[:, 0].astype(np.float32) % 2, {}


@pytest.mark.parametrize("rank", [0, 4])
def test_grpo_second_step_reuses_the_compiled_update(rank):
    cfg = dataclasses.replace(configs.tiny(), lora=LoraConfig(rank=rank))
    trainer = grpo.GRPOTrainer(cfg, cfg.model, _reward)
    state = trainer.init_state(train.start_params(cfg, _loaded(cfg.model)))
    sizes = []
    for i in range(3):
        state, _ = trainer.grpo_step(state, PROMPTS, [{}] * len(PROMPTS), jax.random.key(i))
        sizes.append(grpo.update_minibatch._cache_size())
    assert sizes[0] == sizes[1] == sizes[2], sizes


@pytest.mark.parametrize("rank", [0, 4])
def test_sft_second_step_reuses_the_compiled_step(rank):
    cfg = TrainConfig(stage="sft", model=DENSE, sft_batch_size=8, micro_batch_size=4, data=DataConfig(seq_len=16),
                      optim=OptimConfig(lr=1e-2), lora=LoraConfig(rank=rank))  # fmt: skip
    stage = train.SFTStage(cfg, DENSE, ByteTokenizer(), None)
    state = stage.init(train.start_params(cfg, _loaded(DENSE)))
    batch = [{"prompt_text": f"{a} + {a + 3} =", "completion": f" {2 * a + 3}"} for a in range(8)]
    sizes = []
    for i in range(3):
        state, _ = stage.step(state, batch, jax.random.key(i))
        sizes.append(sft.sft_step._cache_size())
    assert sizes[0] == sizes[1] == sizes[2], sizes
