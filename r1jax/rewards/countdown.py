"""Countdown (TinyZero): combine the given numbers with + - * / and parentheses to reach the target.

The equation is read by a small tokenizer and recursive-descent parser with exact ``Fraction`` arithmetic; nothing
is ever passed to ``eval``. Bounds keep hostile input cheap: at most ``MAX_CHARS`` characters, ``MAX_TOKENS``
tokens, ``MAX_DEPTH`` nested parentheses, ``MAX_DIGITS`` digits per number and ``MAX_BITS`` bits in any numerator
or denominator. Grammar (no unary operators, no implicit multiplication, no exponentiation)::

    expr   := term (("+" | "-") term)*
    term   := factor (("*" | "/") factor)*
    factor := NUMBER | "(" expr ")"

``x`` / ``×`` / ``÷`` are read as ``*`` / ``*`` / ``/``. An optional right-hand side ``= N`` (a single number) is
accepted and ignored: only the left-hand side's value counts.
"""

from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from r1jax.config import RewardConfig
from r1jax.rewards.extract import extract_answer

MAX_CHARS = 256
MAX_TOKENS = 128
MAX_DEPTH = 32
MAX_DIGITS = 12
MAX_BITS = 256


class ExpressionError(ValueError):
    """The text is not a well-formed, bounded Countdown equation."""


_OPS = {"+": "+", "-": "-", "*": "*", "/": "/", "x": "*", "X": "*", "×": "*", "÷": "/", "−": "-", "(": "(", ")": ")"}


def tokenize(text: str) -> list[int | str]:
    """Numbers (int) and operator / parenthesis tokens (str)."""
    if len(text) > MAX_CHARS:
        raise ExpressionError("expression too long")
    tokens: list[int | str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif "0" <= c <= "9":
            j = i
            while j < n and "0" <= text[j] <= "9":
                j += 1
            if j - i > MAX_DIGITS:
                raise ExpressionError("number too long")
            tokens.append(int(text[i:j]))
            i = j
        elif c in _OPS:
            tokens.append(_OPS[c])
            i += 1
        else:
            raise ExpressionError(f"unexpected character {c!r}")
        if len(tokens) > MAX_TOKENS:
            raise ExpressionError("too many tokens")
    return tokens


class _Parser:
    def __init__(self, tokens: list[int | str]):
        self.tokens = tokens
        self.pos = 0
        self.numbers: list[int] = []

    def peek(self) -> int | str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> int | str | None:
        tok = self.peek()
        self.pos += 1
        return tok

    def expr(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            op = self.take()
            rhs = self.term(depth)
            value = _bounded(value + rhs if op == "+" else value - rhs)
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self.peek() in ("*", "/"):
            op = self.take()
            rhs = self.factor(depth)
            if op == "*":
                value = _bounded(value * rhs)
            elif rhs == 0:
                raise ExpressionError("division by zero")
            else:
                value = _bounded(value / rhs)
        return value

    def factor(self, depth: int) -> Fraction:
        tok = self.take()
        if isinstance(tok, int):
            self.numbers.append(tok)
            return Fraction(tok)
        if tok == "(":
            if depth >= MAX_DEPTH:
                raise ExpressionError("nesting too deep")
            value = self.expr(depth + 1)
            if self.take() != ")":
                raise ExpressionError("missing ')'")
            return value
        raise ExpressionError(f"unexpected token {tok!r}")


def _bounded(x: Fraction) -> Fraction:
    if x.numerator.bit_length() > MAX_BITS or x.denominator.bit_length() > MAX_BITS:
        raise ExpressionError("intermediate value too large")
    return x


def evaluate(text: str) -> tuple[Fraction, list[int]]:
    """(exact value, numbers used in order) of an equation's left-hand side; raises ``ExpressionError``."""
    lhs, eq, rhs = text.partition("=")
    if eq:
        rhs_tokens = tokenize(rhs)
        if len(rhs_tokens) != 1 or not isinstance(rhs_tokens[0], int):
            raise ExpressionError("right-hand side must be a single number")
    tokens = tokenize(lhs)
    if not tokens:
        raise ExpressionError("empty expression")
    parser = _Parser(tokens)
    value = parser.expr(0)
    if parser.pos != len(tokens):
        raise ExpressionError("trailing tokens")
    return value, parser.numbers


def numbers_ok(used: list[int], available: list[int], exact: bool) -> bool:
    """Each available number used at most once (``exact``: every one exactly once), nothing else used."""
    pool = sorted(available)
    if exact:
        return sorted(used) == pool
    remaining = list(pool)
    for u in used:
        if u not in remaining:
            return False
        remaining.remove(u)
    return True


def countdown_reward(completion: str, meta: Mapping[str, Any], cfg: RewardConfig) -> float:
    """1.0 if the answer equation reaches ``meta["target"]`` using ``meta["numbers"]`` (each exactly once with
    ``cfg.countdown_exact_use``, at most once otherwise); ``cfg.countdown_format_score`` for a well-formed equation
    that misses the target or misuses the numbers; 0.0 when there is no parseable equation.

    The equation is the ``<answer>`` block or ``\\boxed{}`` content (rules of ``extract_answer``).
    """
    answer, _ = extract_answer(completion, cfg.think_prefilled)
    if answer is None:
        return 0.0
    try:
        value, used = evaluate(answer)
    except (ExpressionError, RecursionError):
        return 0.0
    target = Fraction(int(meta["target"]))
    if value == target and numbers_ok(used, [int(x) for x in meta["numbers"]], cfg.countdown_exact_use):
        return 1.0
    return float(cfg.countdown_format_score)
