"""Tokenizer: HF ``tokenizer.json`` through the ``tokenizers`` package, chat templates through jinja2.

Chat templates are rendered the way transformers renders them: a sandboxed jinja2 environment with ``trim_blocks``,
``lstrip_blocks``, the loop-controls extension, ``raise_exception``, ``strftime_now`` and a ``tojson`` filter.
Templates come from the checkpoint; the sandbox keeps them from reaching Python objects.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path

from r1jax.errors import CheckpointError, ConfigError


class Tokenizer:
    def __init__(self, tokenizer_json: str, config: dict | None = None):
        from tokenizers import Tokenizer as HFTokenizer

        self._tok = HFTokenizer.from_str(tokenizer_json)
        self.config = config or {}

    @classmethod
    def from_dir(cls, path: str) -> Tokenizer:
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tj):
            raise CheckpointError(f"{path}: no tokenizer.json")
        cfg_path = os.path.join(path, "tokenizer_config.json")
        config = json.loads(Path(cfg_path).read_text()) if os.path.exists(cfg_path) else {}
        template = os.path.join(path, "chat_template.jinja")
        if os.path.exists(template) and not config.get("chat_template"):
            config["chat_template"] = Path(template).read_text()
        return cls(Path(tj).read_text(), config)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _special(self, key: str) -> str | None:
        v = self.config.get(key)
        return v.get("content") if isinstance(v, dict) else v

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self._special("bos_token"))

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self._special("eos_token"))

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        add_bos = self.config.get("add_bos_token", False) if add_bos is None else add_bos
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None and ids[:1] != [self.bos_id] else ids

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def chat_template(self) -> str | None:
        return self.config.get("chat_template")

    @cached_property
    def _template(self):
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(f"chat template error: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """Render ``messages`` with the checkpoint's chat template (a ValueError if it has none)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._special("bos_token") or "",
            eos_token=self._special("eos_token") or "",
        )

    def to_files(self) -> dict[str, str]:
        return {"tokenizer.json": self._tok.to_str(), "tokenizer_config.json": json.dumps(self.config, indent=2)}


class ByteTokenizer:
    """UTF-8 bytes as tokens 0-255 plus ``<bos>`` 256, ``<eos>`` 257, ``<pad>`` 258: lets randomly initialised
    models (tests, demos) run the text pipeline — prompts, rewards, SFT — with no vocabulary file."""

    BOS, EOS, PAD = 256, 257, 258
    vocab_size = 259
    chat_template = None
    config: dict = {}

    @property
    def bos_id(self) -> int:
        return self.BOS

    @property
    def eos_id(self) -> int:
        return self.EOS

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        return ([self.BOS] if add_bos else []) + list(text.encode("utf-8", errors="replace"))

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        raise ValueError("the byte tokenizer has no chat template")

    def to_files(self) -> dict[str, str]:
        return {}


def for_model(cfg, files: Mapping[str, str], *, byte_fallback: bool = False) -> Tokenizer | ByteTokenizer:
    """The tokenizer of a model (``cfg`` its ModelConfig, ``files`` its ``Transformer.tokenizer_files``): the saved
    ``tokenizer.json``, or with ``byte_fallback`` the byte tokenizer when there is none (randomly initialised
    models). The one place every command builds its tokenizer. ``CheckpointError`` when there is none to use,
    ``ConfigError`` when it has more tokens than the model's vocabulary."""
    if "tokenizer.json" in files:
        tok = Tokenizer(files["tokenizer.json"], json.loads(files.get("tokenizer_config.json") or "{}"))
    elif byte_fallback:
        tok = ByteTokenizer()
    else:
        raise CheckpointError("the model has no tokenizer files (tokenizer.json)")
    if tok.vocab_size > cfg.vocab_size:
        raise ConfigError(
            f"tokenizer has {tok.vocab_size} tokens but the model's vocabulary is {cfg.vocab_size}: "
            "use the tokenizer that belongs to the checkpoint"
        )
    return tok


def stop_ids(cfg, tokenizer) -> list[int]:
    """Token ids that end a completion: the model config's EOS ids and the tokenizer's."""
    eos = tokenizer.eos_id
    return sorted({*cfg.eos_token_ids, *([eos] if eos is not None else [])})
