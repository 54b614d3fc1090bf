"""Language-consistency reward (DeepSeek-R1 section 2.3.3): the share of target-language words in the reasoning.

Words are counted per script: a maximal run of letters for alphabetic scripts (Latin, Cyrillic, Arabic, Hangul),
one word per character for Han and kana (no spaces between words). LaTeX commands (``\\frac``) and digits are not
words. Languages map to scripts: en -> Latin, zh -> Han, ja -> Han + kana, ko -> Hangul (+ Han), ru -> Cyrillic,
ar -> Arabic.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from r1jax.config import LANGUAGES, RewardConfig
from r1jax.rewards.extract import split_reasoning

_SCRIPTS = {
    "latin": r"[A-Za-z\u00C0-\u00D6\u00D8-\u00F6\u00F8-\u024F]+",
    "cyrillic": r"[\u0400-\u04FF]+",
    "arabic": r"[\u0600-\u06FF]+",
    "hangul": r"[\uAC00-\uD7AF\u1100-\u11FF]+",
    "han": r"[\u4E00-\u9FFF\u3400-\u4DBF\uF900-\uFAFF]",
    "kana": r"[\u3040-\u309F\u30A0-\u30FF]",
}
_WORD = re.compile("|".join(f"(?P<{name}>{pat})" for name, pat in _SCRIPTS.items()))
_LATEX_CMD = re.compile(r"\\[A-Za-z]+")
_TARGET_SCRIPTS = {
    "en": {"latin"},
    "zh": {"han"},
    "ja": {"han", "kana"},
    "ko": {"hangul", "han"},
    "ru": {"cyrillic"},
    "ar": {"arabic"},
}
assert set(_TARGET_SCRIPTS) == LANGUAGES


def target_word_share(text: str, language: str) -> float:
    """Share in [0, 1] of words of ``text`` written in ``language``'s scripts; 0.0 when there are no words."""
    targets = _TARGET_SCRIPTS[language]
    total = hits = 0
    for m in _WORD.finditer(_LATEX_CMD.sub(" ", text)):
        total += 1
        hits += m.lastgroup in targets
    return hits / total if total else 0.0


def language_consistency(completion: str, meta: Mapping[str, Any], cfg: RewardConfig) -> float:
    """Share of target-language words (``meta["language"]`` or ``cfg.target_language``) in the reasoning: the think
    block, or the whole completion when there is none. Empty reasoning scores 0.0."""
    language = meta.get("language", cfg.target_language)
    if language not in _TARGET_SCRIPTS:
        raise ValueError(f"unknown language {language!r}")
    reasoning, _ = split_reasoning(completion, cfg.think_prefilled)
    return target_word_share(completion if reasoning is None else reasoning, language)
