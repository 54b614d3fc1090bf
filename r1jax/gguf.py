"""GGUF files (llama.cpp): llama-architecture models with their tokenizer and chat template.

A GGUF file is turned into what a HF directory holds — a ``config.json`` dict, HF-named tensors and a
``tokenizer.json`` — so the one HF key table in ``hf.py`` places the weights. Quantised tensors (Q4_0, Q4_1, Q8_0,
K-quants, ...) are dequantised by the ``gguf`` package. llama.cpp stores the q and k projections with their rows
permuted for its rotary layout; the permutation is undone here.
"""

from __future__ import annotations

import json
import re

import numpy as np

from r1jax.errors import CheckpointError

# GGUF tensor name -> HF key ({i}: block index)
NAMES = [
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", "model.layers.{i}.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q\.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    (r"blk\.(\d+)\.attn_k\.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    (r"blk\.(\d+)\.attn_v\.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    (r"blk\.(\d+)\.attn_output\.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", "model.layers.{i}.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", "model.layers.{i}.mlp.down_proj.weight"),
    (r"rope_freqs\.weight", None),
]
# GGUF metadata key (after "llama.") -> HF config key
CONFIG = {
    "vocab_size": "vocab_size",
    "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "context_length": "max_position_embeddings",
}
TOKEN_TYPE_CONTROL = 3


def _reader(path: str):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the gguf package raises assorted errors for malformed files
        raise CheckpointError(f"{path}: not a readable GGUF file ({e.__class__.__name__}: {e})") from None


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def hf_config(path: str, reader=None) -> dict:
    reader = reader or _reader(path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (only llama)")
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu"}
    for k, hf_key in CONFIG.items():
        v = _field(reader, f"llama.{k}")
        if v is not None:
            cfg[hf_key] = v
    if "vocab_size" not in cfg:
        cfg["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    names = {t.name for t in reader.tensors}
    cfg["tie_word_embeddings"] = "output.weight" not in names
    cfg["bos_token_id"] = _field(reader, "tokenizer.ggml.bos_token_id")
    cfg["eos_token_id"] = _field(reader, "tokenizer.ggml.eos_token_id")
    cfg["pad_token_id"] = _field(reader, "tokenizer.ggml.padding_token_id")
    scaling = _field(reader, "llama.rope.scaling.type")
    if scaling and scaling != "none":
        cfg["rope_scaling"] = {
            "rope_type": scaling,
            "factor": _field(reader, "llama.rope.scaling.factor", 1.0),
            "original_max_position_embeddings": _field(reader, "llama.rope.scaling.original_context_length"),
        }
    return cfg


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of q/k projections ([out, in])."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFTensors:
    """The tensors of a GGUF file under their HF keys (``names``, ``shape``, ``location``, ``read``). ``read``
    copies one tensor's bytes from the file (no memory map stays touched) and dequantises them to float32 in HF
    ``[out, in]`` layout, with llama.cpp's rotary row permutation of q/k undone."""

    def __init__(self, path: str, reader=None):
        self.path = path
        reader = reader or _reader(path)
        cfg = hf_config(path, reader)
        heads = {".attn_q.": cfg["num_attention_heads"], ".attn_k.": cfg.get("num_key_value_heads")}
        self._tensors = {}
        for t in reader.tensors:
            m, hf_key = next(((m, k) for p, k in NAMES if (m := re.fullmatch(p, t.name))), (None, None))
            if m is None:
                raise CheckpointError(f"{path}: unknown GGUF tensor {t.name!r}")
            if hf_key is None:
                continue
            key = hf_key.format(i=m.group(1)) if m.groups() else hf_key
            n_head = next((h for tag, h in heads.items() if tag in t.name), None)
            # what the tensor's bytes read back as: the reader's own (memory-mapped) view gives dtype and shape
            layout = (int(t.data_offset), int(t.n_bytes), t.data.dtype, tuple(t.data.shape), t.tensor_type)
            self._tensors[key] = (tuple(int(s) for s in reversed(t.shape)), n_head, layout)

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._tensors[key][0]

    def location(self, key: str) -> str:
        return self.path

    def read(self, key: str) -> np.ndarray:
        from gguf.quants import dequantize

        shape, n_head, (offset, n_bytes, dtype, raw_shape, qtype) = self._tensors[key]
        raw = np.empty(n_bytes, np.uint8)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(offset)
            if f.readinto(memoryview(raw)) != n_bytes:
                raise CheckpointError(f"{self.path}: file ends inside tensor {key!r} (truncated?)")
        w = np.asarray(dequantize(raw.view(dtype).reshape(raw_shape), qtype), np.float32).reshape(shape)
        return _unpermute(w, n_head) if n_head else w


def tokenizer_files(path: str, reader=None) -> dict[str, str]:
    """``tokenizer.json`` and ``tokenizer_config.json`` contents built from the GGUF vocabulary (byte-level BPE)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    reader = reader or _reader(path)
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(f"{path}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    types = _field(reader, "tokenizer.ggml.token_type")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = _field(reader, "tokenizer.ggml.pre")
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if pre in ("smollm", "llama3", "llama-bpe", "qwen2", "deepseek-r1-qwen")
        else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty == TOKEN_TYPE_CONTROL
        ]
    )

    def name(key):
        i = _field(reader, f"tokenizer.ggml.{key}")
        return None if i is None else tokens[i]

    config = {
        "bos_token": name("bos_token_id"),
        "eos_token": name("eos_token_id"),
        "pad_token": name("padding_token_id"),
        "unk_token": name("unknown_token_id"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    return {"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(config, indent=2)}
