"""Countdown verifier: does the reply's equation reach `target` using only the given numbers?

    countdown_reward(response, numbers, target) -> (reward, info)

The equation is the last `\\boxed{...}`, else the rest of the line after the last "answer:", else
the last line with a digit, operator or parenthesis. `\\times`, `\\div`, `\\frac{a}{b}` become * and /;
a trailing "= n" (or a leading "target =") is dropped. If that text is not a Python expression
(prose around it), the last run of digits, operators and parentheses in it is used.

The equation is parsed with `ast` and never executed: only integer literals, + - * /, unary minus
and parentheses are allowed (no names, calls, `**`, floats). Each literal must come from `numbers`,
each listed number used at most once (`use_all`: exactly once). The value is computed with
`fractions.Fraction`, so 7/2*2 is exactly 7.

Reward: 1.0 when the value equals `target`; `format_reward` (default 0.1) for a valid equation with
the wrong value; 0.0 otherwise. info: equation, reason, value ("" when not computed), exact, and
parse_error: 1 when no equation could be read (none found, too long, not an expression, disallowed
syntax), 0 when it was read (even if it breaks a rule about the numbers).
"""
from __future__ import annotations

import ast
import re
from collections import Counter
from fractions import Fraction

from reward.math_answer import last_boxed

MAX_EQUATION_CHARS = 200

_ANSWER_MARKER_RE = re.compile(r"answer\s*(?:is\b\s*:?|:)", re.IGNORECASE)
_EQUATION_RUN_RE = re.compile(r"[-\d(][\d\s+\-*/().=]*")
_INTEGER_RE = re.compile(r"-?\d+")
_LATEX_OPERATORS = {"\\times": "*", "\\cdot": "*", "\\div": "/", "×": "*", "÷": "/", "−": "-",
                    "\\left": "", "\\right": "", "$": ""}
_LATEX_FRACTION_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_BINARY_OPS = (ast.Add, ast.Sub, ast.Mult, ast.Div)
_UNARY_OPS = (ast.USub, ast.UAdd)


class _Rejected(Exception):
    """The equation breaks a rule; the message is the reason. `syntax`: it is not countdown arithmetic
    at all (a parse error), rather than a rule about the numbers."""

    def __init__(self, reason: str, syntax: bool = False):
        super().__init__(reason)
        self.syntax = syntax


def _equation_text(response: str) -> str | None:
    """The part of the reply that should hold the equation (see the module docstring)."""
    boxed = last_boxed(response)
    if boxed:
        return boxed
    markers = list(_ANSWER_MARKER_RE.finditer(response))
    if markers:
        rest = response[markers[-1].end():].strip()
        if rest:
            return rest.split("\n", 1)[0]
    lines = [line for line in response.splitlines() if re.search(r"[\d+\-*/()]", line)]
    return lines[-1] if lines else None


def _drop_equals_number(text: str, target: int | None) -> str:
    """"25+7*3 = 46" -> "25+7*3"; "46 = 25+7*3" -> "25+7*3" (when 46 is the target)."""
    sides = [side.strip() for side in text.replace("==", "=").split("=")]
    if len(sides) == 2:
        if _INTEGER_RE.fullmatch(sides[1]):
            return sides[0]
        if _INTEGER_RE.fullmatch(sides[0]) and (target is None or int(sides[0]) == target):
            return sides[1]
    return text


def _parses(text: str) -> bool:
    if not text or len(text) > MAX_EQUATION_CHARS:
        return False
    try:
        ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


def extract_equation(response: str, target: int | None = None) -> str | None:
    """The equation in `response` as text ("25+7*3"), without a trailing "= target".

    The whole candidate line is taken when it parses as a Python expression (so names, calls and
    `**` reach the checker and are rejected with a reason); otherwise, for prose around the equation,
    the last run of digits, operators and parentheses in it.
    """
    text = _equation_text(response)
    if text is None:
        return None
    text = _LATEX_FRACTION_RE.sub(r"(\1)/(\2)", text)
    for latex, plain in _LATEX_OPERATORS.items():
        text = text.replace(latex, plain)
    text = text.replace("{", "(").replace("}", ")").strip().rstrip(".!").strip()
    whole = _drop_equals_number(text, target)
    if _parses(whole):
        return whole
    runs = [run for run in _EQUATION_RUN_RE.findall(text) if re.search(r"\d", run)]
    if not runs:
        return None
    return _drop_equals_number(runs[-1].strip().rstrip(".").strip(), target) or None


def _evaluate(node: ast.AST, available: Counter, used: Counter) -> Fraction:
    """Value of a checked expression tree; counts the literals it uses in `used`."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, available, used)
    if isinstance(node, ast.Constant):
        if type(node.value) is not int:
            raise _Rejected(f"only whole numbers are allowed, got {node.value!r}")
        if available[node.value] == 0:
            raise _Rejected(f"number {node.value} is not one of the given numbers")
        used[node.value] += 1
        if used[node.value] > available[node.value]:
            raise _Rejected(f"number {node.value} used more times than given")
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        value = _evaluate(node.operand, available, used)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _evaluate(node.left, available, used), _evaluate(node.right, available, used)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
        if right == 0:
            raise _Rejected("division by zero")
        return left / right
    what = type(node.op).__name__ if isinstance(node, (ast.BinOp, ast.UnaryOp)) else type(node).__name__
    raise _Rejected(f"disallowed syntax: {what}", syntax=True)


def _format_value(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def countdown_reward(response: str, numbers: list[int] | tuple[int, ...], target: int,
                     format_reward: float = 0.1, use_all: bool = False) -> tuple[float, dict]:
    """(reward, info) for a countdown reply; see the module docstring for the rules."""
    if not isinstance(response, str):
        raise TypeError(f"countdown_reward expects the response text, got {type(response).__name__}")
    equation = extract_equation(response, target)
    info = {"equation": equation or "", "value": "", "exact": False, "parse_error": 1}
    if equation is None:
        return 0.0, {**info, "reason": "no equation found"}
    if len(equation) > MAX_EQUATION_CHARS:
        return 0.0, {**info, "reason": f"equation longer than {MAX_EQUATION_CHARS} characters"}
    try:
        tree = ast.parse(equation, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return 0.0, {**info, "reason": "not a valid expression"}
    available, used = Counter(int(n) for n in numbers), Counter()
    try:
        value = _evaluate(tree, available, used)
    except _Rejected as rejected:
        return 0.0, {**info, "reason": str(rejected), "parse_error": int(rejected.syntax)}
    except RecursionError:
        return 0.0, {**info, "reason": "expression nested too deeply"}
    info["parse_error"] = 0
    if use_all and used != available:
        return 0.0, {**info, "reason": "not every number was used"}
    info["value"] = _format_value(value)
    if value == target:
        return 1.0, {**info, "exact": True, "reason": "correct"}
    return float(format_reward), {**info, "reason": f"valid equation but equals {info['value']}, not {target}"}
