"""Final-answer extraction and math-equivalence reward, verified with the `math_verify` package.

    extract_answer(text)        -> the last `\\boxed{...}`, else the text after "answer:" / "answer is",
                                   else the last number in the text (None if there is none)
    math_reward(response, gold) -> (reward, info): 1.0 when math_verify finds the extracted answer
                                   equal to `gold` (14 == 14.0, 1/2 == 0.5 == \\frac{1}{2}), else 0.0,
                                   plus `format_bonus` when the answer was given explicitly (boxed or
                                   after "answer").

Runs in any thread. math_verify's own timeouts use `signal.alarm`, which raises off the main thread,
so there they are switched off and instead the answer is screened before sympy sees it: at most
`max_answer_chars` characters, no factorials, at most two powers with short exponents and only
common LaTeX commands. Such answers verify in about a second at worst (`9^9^9` would never finish).
On the main thread math_verify's 5 s alarm is kept as well, unless a SIGALRM timer is already
armed (the env actor's own step timeout), which math_verify's alarm would silently cancel.
"""
from __future__ import annotations

import logging
import re
import threading

from math_verify import parse, verify

MAIN_THREAD_TIMEOUT_S = 5

# A plain number: optional sign (not a binary minus), digits with optional thousands commas,
# decimals and an optional "/denominator".
_NUMBER = r"(?:(?<![\w)\]}])-)?\d+(?:,\d{3})*(?:\.\d+)?(?:\s*/\s*\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_LEADING_NUMBER_THEN_WORDS_RE = re.compile(rf"({_NUMBER})\s+[a-z]", re.IGNORECASE)
_ANSWER_MARKER_RE = re.compile(r"answer\s*(?:is\b\s*:?|:)", re.IGNORECASE)
_PLAIN_NUMBER_RE = re.compile(
    r"[-+]?\d+(?:,\d{3})*(?:\.\d+)?(?:\s*/\s*\d+)?|[-+]?\\[dt]?frac\{\s*\d+\s*\}\{\s*\d+\s*\}"
)
_STRIP_CHARS = " \t\n$.,;:!?*"

# math_verify input screening (see the module docstring).
_POWER_RE = re.compile(r"\^|\*\*")
_EXPONENT_RE = re.compile(r"\s*(?:\{\s*([-+]?[\w.]*)\s*\}|\(\s*([-+]?[\w.]*)\s*\)|([-+]?[\w.]+))")
_FACTORIAL_RE = re.compile(r"[\w)}\]]\s*!")
_LATEX_COMMAND_RE = re.compile(r"\\([a-zA-Z]+)")
_ALLOWED_LATEX = frozenset(
    "frac dfrac tfrac sqrt pi cdot times div pm mp left right infty text textbf textit mathrm mathbf "
    "circ degree percent quad qquad le ge leq geq ne neq approx in cup cap emptyset varnothing "
    "sin cos tan cot sec csc log ln exp "
    "alpha beta gamma delta epsilon varepsilon theta vartheta lambda mu nu rho sigma tau phi varphi "
    "omega Delta Gamma Theta Lambda Sigma Phi Omega".split()
)


class _DropNoTimeoutWarning(logging.Filter):
    """math_verify warns once per process that timeouts are off; this module screens inputs instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropNoTimeoutWarning())


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) with balanced braces, else None."""
    for match in reversed(list(re.finditer(r"\\(?:boxed|fbox)\s*\{", text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


def _after_answer_marker(text: str) -> str | None:
    """The rest of the line after the last "answer:" / "answer is" (or the next non-empty line)."""
    markers = list(_ANSWER_MARKER_RE.finditer(text))
    if not markers:
        return None
    rest = text[markers[-1].end():].lstrip()
    line = rest.split("\n", 1)[0].strip().strip(_STRIP_CHARS)
    if not line:
        return None
    if "=" in line:  # "answer: x = 5" -> "5"
        line = line.rsplit("=", 1)[1].strip(_STRIP_CHARS)
    leading = _LEADING_NUMBER_THEN_WORDS_RE.match(line)  # "14 apples" -> "14"
    return leading.group(1) if leading else (line or None)


def extract_answer_with_source(text: str) -> tuple[str | None, str]:
    """(answer, source) with source one of "boxed", "marker", "last_number", "none"."""
    boxed = last_boxed(text)
    if boxed:
        return boxed, "boxed"
    marked = _after_answer_marker(text)
    if marked:
        return marked, "marker"
    numbers = _NUMBER_RE.findall(text)
    if numbers:
        return numbers[-1], "last_number"
    return None, "none"


def extract_answer(text: str) -> str | None:
    """The final answer in `text`: last `\\boxed{}`, else after "answer:"/"answer is", else last number."""
    return extract_answer_with_source(text)[0]


def is_plain_number(answer: str) -> bool:
    """True for an integer, decimal, `a/b` or `\\frac{a}{b}` (optionally signed, optionally in `$`)."""
    return _PLAIN_NUMBER_RE.fullmatch(answer.strip().strip("$").strip()) is not None


def unsafe_to_verify(answer: str, max_answer_chars: int = 100) -> str | None:
    """Why sympy could take too long on `answer`, or None when it is safe to verify."""
    if len(answer) > max_answer_chars:
        return f"answer longer than {max_answer_chars} characters"
    if _FACTORIAL_RE.search(answer):
        return "factorial"
    for command in _LATEX_COMMAND_RE.findall(answer):
        if command not in _ALLOWED_LATEX:
            return f"unsupported latex command \\{command}"
    power_ends = [m.end() for m in _POWER_RE.finditer(answer)]
    if len(power_ends) > 2:
        return "more than two powers"
    max_exponent_chars = 3 if len(power_ends) == 1 else 2
    for end in power_ends:
        exponent = _EXPONENT_RE.match(answer, end)
        body = exponent and next((g for g in exponent.groups() if g is not None), None)
        if body is None or len(body) > max_exponent_chars:
            return "exponent too large"
        if _POWER_RE.match(answer[exponent.end():].lstrip()):  # 9^9^9 is 9^(9^9)
            return "chained powers"
    return None


def _as_latex(answer: str) -> str:
    return answer if "$" in answer else f"${answer}$"


def _alarm_is_free() -> bool:
    import signal

    return (threading.current_thread() is threading.main_thread()
            and signal.getitimer(signal.ITIMER_REAL)[0] == 0)


def math_reward(response: str, gold: str, format_bonus: float = 0.0, numeric_only: bool = False,
                max_answer_chars: int = 100) -> tuple[float, dict]:
    """(reward, info): 1.0 if the extracted answer equals `gold` by math_verify, else 0.0.

    `format_bonus` is added when the answer was boxed or followed "answer". With `numeric_only`
    the answer must be a plain number (so "(3+4)*2" does not count as the value 14).
    info: answer (str, "" if none), answer_source, exact (bool), reason, parse_error (1 when no
    answer could be read and compared with `gold`: none found, not a plain number, unsafe, unparseable).
    """
    if not isinstance(response, str):
        raise TypeError(f"math_reward expects the response text, got {type(response).__name__}")
    answer, source = extract_answer_with_source(response)
    info = {"answer": answer or "", "answer_source": source, "exact": False, "parse_error": 1}
    if answer is None:
        return 0.0, {**info, "reason": "no answer found"}
    bonus = format_bonus if source in ("boxed", "marker") else 0.0
    if numeric_only and not is_plain_number(answer):
        return bonus, {**info, "reason": "answer is not a plain number"}
    problem = unsafe_to_verify(answer, max_answer_chars)
    if problem:
        return bonus, {**info, "reason": f"not verified: {problem}"}
    timeout = MAIN_THREAD_TIMEOUT_S if _alarm_is_free() else None
    gold_parsed = parse(_as_latex(str(gold)), parsing_timeout=timeout)
    answer_parsed = parse(_as_latex(answer), parsing_timeout=timeout)
    if not gold_parsed:
        raise ValueError(f"math_reward could not parse the gold answer {gold!r}")
    if not answer_parsed:
        return bonus, {**info, "reason": "answer could not be parsed"}
    exact = bool(verify(gold_parsed, answer_parsed, timeout_seconds=timeout))
    reason = "correct" if exact else "wrong answer"
    return float(exact) + bonus, {**info, "exact": exact, "reason": reason, "parse_error": 0}
