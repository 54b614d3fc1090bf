"""Answer extraction shared by the reward functions: reasoning / answer regions, ``\\boxed{}``, ``<answer>`` tags,
GSM8K ``####`` and plain numbers.

Every scan here is linear in the text length (single passes, no backtracking-prone regexes), so adversarial strings
cost O(n). Extraction rules, chosen against reward hacking:

- The answer is looked for only after the last ``</think>`` when there is one; a completion that opens ``<think>``
  (or starts inside it, ``think_prefilled``) and never closes it has no answer (truncated reasoning).
- More than one ``<answer>`` (or ``</answer>``) tag: no answer (hedging across blocks). An unclosed block: none.
- With an ``<answer>`` block present, only its content counts; ``\\boxed{}`` outside it is ignored.
- Several ``\\boxed{}`` with different contents in the searched span: no answer (hedging). Repeats of the same
  content are fine.
"""

from __future__ import annotations

import re
from fractions import Fraction

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
_BOXED_CMDS = ("\\boxed", "\\fbox")
MAX_NUMBER_CHARS = 64  # longer digit strings are not numbers anyone should be rewarded for


def split_reasoning(text: str, think_prefilled: bool = False) -> tuple[str | None, str | None]:
    """(reasoning, answer_region) of a completion.

    - ``think_prefilled`` (the prompt ends with ``<think>``), or no ``<think>`` but a ``</think>``: the completion
      starts inside the think block; reasoning = text before the first ``</think>``.
    - ``<think>`` present: reasoning = text between the first ``<think>`` and the first ``</think>`` after it.
    - neither tag: no think block; reasoning = None and the whole text is the answer region.

    The answer region is the text after the last ``</think>``; None when the think block is never closed.
    """
    close_last = text.rfind(THINK_CLOSE)
    open_first = -1 if think_prefilled else text.find(THINK_OPEN)
    if think_prefilled or (open_first < 0 and close_last >= 0):
        close_first = text.find(THINK_CLOSE)
        if close_first < 0:
            return text, None
        return text[:close_first], text[close_last + len(THINK_CLOSE) :]
    if open_first < 0:
        return None, text
    start = open_first + len(THINK_OPEN)
    close_first = text.find(THINK_CLOSE, start)
    if close_first < 0:
        return text[start:], None
    return text[start:close_first], text[close_last + len(THINK_CLOSE) :]


def find_boxed(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` / ``\\fbox{...}`` in order, nested braces allowed, in one linear pass.

    Escaped braces ``\\{`` and ``\\}`` are literal (e.g. ``\\boxed{\\{1, 2\\}}``). Unclosed boxes are dropped. The
    brace-less form ``\\boxed 5`` takes the next whitespace-delimited token.
    """
    out: list[tuple[int, str]] = []
    stack: list[tuple[int, bool]] = []  # (content start, opened by a box command)
    i, n = 0, len(text)
    pending_box = False
    while i < n:
        c = text[i]
        if c == "\\":
            if i + 1 < n and text[i + 1] in "{}":
                i += 2
                continue
            cmd = next((b for b in _BOXED_CMDS if text.startswith(b, i)), None)
            if cmd is not None:
                j = i + len(cmd)
                if j < n and (text[j].isalpha()):
                    i = j  # a longer command such as \boxedx
                    continue
                while j < n and text[j] == " ":
                    j += 1
                if j < n and text[j] == "{":
                    pending_box = True
                    i = j
                    continue
                end = j
                while end < n and not text[end].isspace() and text[end] not in "$\\":
                    end += 1
                if end > j:
                    out.append((i, text[j:end]))
                i = max(end, j)
                continue
            i += 1
            continue
        if c == "{":
            stack.append((i + 1, pending_box))
            pending_box = False
        elif c == "}" and stack:
            start, boxed = stack.pop()
            if boxed:
                out.append((start, text[start:i]))
        i += 1
    out.sort(key=lambda x: x[0])
    return [s for _, s in out]


def _single_boxed(span: str) -> str | None | bool:
    """The boxed content of ``span``; False when there is none; None when boxes disagree (hedging)."""
    boxes = find_boxed(span)
    if not boxes:
        return False
    distinct = {b.strip() for b in boxes}
    if len(distinct) > 1:
        return None
    return boxes[-1].strip() or None


def extract_answer(text: str, think_prefilled: bool = False) -> tuple[str | None, str]:
    """(answer, source) with source in {"tag", "boxed", "none"}; see the module docstring for the rules."""
    _, region = split_reasoning(text, think_prefilled)
    if region is None:
        return None, "none"
    n_open, n_close = region.count(ANSWER_OPEN), region.count(ANSWER_CLOSE)
    if n_open > 1 or n_close > 1 or n_open != n_close:
        return None, "none"
    if n_open == 1:
        start = region.find(ANSWER_OPEN) + len(ANSWER_OPEN)
        end = region.find(ANSWER_CLOSE, start)
        if end < 0:
            return None, "none"
        content = region[start:end]
        boxed = _single_boxed(content)
        if boxed is False:
            content = content.strip()
            return (content, "tag") if content else (None, "none")
    else:
        boxed = _single_boxed(region)
    if boxed is False or boxed is None:
        return None, "none"
    return boxed, "boxed"


_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?")
_FRAC = re.compile(r"\\[dt]?frac\{([-+]?\d+)\}\{(\d+)\}")
_TEXT = re.compile(r"\\(?:text|mathrm|textbf)\{[^{}]*\}")


def _to_fraction(token: str) -> Fraction | None:
    if len(token) > MAX_NUMBER_CHARS:
        return None
    try:
        value = Fraction(token.rstrip("."))
    except (ValueError, ZeroDivisionError):
        return None
    return value


def normalize_number_text(span: str) -> str:
    """Strip what decorates a number in GSM8K-style answers: $ signs, thousands commas, LaTeX spacing, \\text{} units,
    %, a trailing period."""
    s = span.replace("\\$", "").replace("$", "").replace("\\!", "").replace("\\,", "").replace("%", "")
    s = s.replace("\\%", "")
    s = _TEXT.sub("", s)
    s = _FRAC.sub(r"\1/\2", s)
    s = _THOUSANDS.sub("", s)
    return s.strip().rstrip(".").strip()


def parse_number(span: str, last_number: bool = True) -> Fraction | None:
    """Exact value of a numeric answer span: ``"1,234"``, ``"$72.00"``, ``"-3"``, ``"3/4"``, ``"\\frac{3}{4}"``.

    If the normalised span is not itself a number and ``last_number`` is True, the last number in it counts (e.g.
    "The answer is 72"); otherwise None.
    """
    s = normalize_number_text(span)
    full = _NUMBER.fullmatch(s)
    if full:
        return _to_fraction(s)
    if not last_number:
        return None
    last = None
    for match in _NUMBER.finditer(s):
        last = match
    return _to_fraction(last.group(0)) if last else None


def gsm8k_gold(answer: str) -> str:
    """The final answer of a GSM8K solution string (the text after the last ``####``), or the string itself."""
    idx = answer.rfind("####")
    return answer[idx + 4 :].strip() if idx >= 0 else answer.strip()
