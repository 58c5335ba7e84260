"""code_tests: write a small Python function; the reward is the share of hidden unit tests it passes.

Single turn. `reset(seed)` picks one of the tasks in `TASKS` and draws its parameters and test inputs
from the seed (e.g. which operator `calc(a, b)` applies, the divisor in `is_multiple(n)`, the shift in
`shift_letters(s)`). `step(text)` takes the code from the answer's ```python block (all such blocks,
joined; else any fenced block; else the whole text; anything before a closing </think> is ignored)
and runs it with the tests in `reward.sandbox` (separate process, no network, no writes outside its
temp folder, time and memory limits). Reward = passed / total, 0 if the run timed out, crashed or
tried something the sandbox blocks. Tests compare with `same(...)`, which also checks types.
"""
from __future__ import annotations

import math
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass

from envs.base import TextEnv
from reward.sandbox import SandboxLimits, run_python_tests


@dataclass(frozen=True)
class Problem:
    task: str
    prompt: str
    tests: tuple[str, ...]
    reference: str  # a correct solution, for tests and sanity checks


@dataclass(frozen=True)
class _Spec:
    signature: str
    description: str
    reference: str
    solve: Callable
    inputs: list[tuple]


def _ints(rng: random.Random, n: int, low: int = -50, high: int = 50) -> list[int]:
    return [rng.randint(low, high) for _ in range(n)]


def _word(rng: random.Random, letters: str = string.ascii_lowercase) -> str:
    return "".join(rng.choice(letters) for _ in range(rng.randint(1, 7)))


def _calc(rng):
    op = rng.choice(["+", "-", "*", "max", "min"])
    expr = f"{op}(a, b)" if op in ("max", "min") else f"a {op} b"
    solve = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "max": max, "min": min}[op]
    return _Spec("calc(a, b)", f"returns {expr} for two integers a and b",
                 f"def calc(a, b):\n    return {expr}\n", solve, [tuple(_ints(rng, 2)) for _ in range(5)])


def _extreme(rng):
    which = rng.choice(["largest", "smallest"])
    fn = max if which == "largest" else min
    return _Spec("extreme(xs)", f"returns the {which} number in the non-empty list of integers xs",
                 f"def extreme(xs):\n    return {fn.__name__}(xs)\n", fn,
                 [(_ints(rng, rng.randint(1, 8)),) for _ in range(5)])


def _reverse(rng):
    if rng.random() < 0.5:
        return _Spec("reverse_text(s)", "returns the string s with its characters in reverse order",
                     "def reverse_text(s):\n    return s[::-1]\n", lambda s: s[::-1],
                     [("",)] + [(_word(rng) + " " + _word(rng),) for _ in range(4)])
    return _Spec("reverse_text(s)", "returns the words of s (separated by single spaces) in reverse order, "
                 "joined by single spaces", "def reverse_text(s):\n    return ' '.join(s.split(' ')[::-1])\n",
                 lambda s: " ".join(s.split(" ")[::-1]),
                 [(" ".join(_word(rng) for _ in range(rng.randint(1, 5))),) for _ in range(5)])


def _is_multiple(rng):
    k = rng.randint(2, 9)
    return _Spec("is_multiple(n)", f"returns True if the integer n is divisible by {k}, else False",
                 f"def is_multiple(n):\n    return n % {k} == 0\n", lambda n: n % k == 0,
                 [(k * rng.randint(-9, 9),) for _ in range(3)] + [(k * rng.randint(1, 9) + 1,), (0,), (7,)])


def _count_chars(rng):
    chars = "aeiou" if rng.random() < 0.5 else "".join(sorted(rng.sample(string.ascii_lowercase, 3)))
    return _Spec("count_chars(s)", f"returns how many characters of the string s are one of {chars!r}",
                 f"def count_chars(s):\n    return sum(c in {chars!r} for c in s)\n",
                 lambda s: sum(c in chars for c in s), [("",)] + [(_word(rng) + _word(rng),) for _ in range(5)])


def _fizzbuzz(rng):
    a, b = rng.sample(range(2, 8), 2)
    ref = (f"def fizzbuzz(n):\n    if n % {a * b} == 0:\n        return 'FizzBuzz'\n    if n % {a} == 0:\n"
           f"        return 'Fizz'\n    if n % {b} == 0:\n        return 'Buzz'\n    return str(n)\n")

    def solve(n):
        return "FizzBuzz" if n % (a * b) == 0 else "Fizz" if n % a == 0 else "Buzz" if n % b == 0 else str(n)
    return _Spec("fizzbuzz(n)", f"returns 'FizzBuzz' if the positive integer n is divisible by both {a} and {b}, "
                 f"'Fizz' if only by {a}, 'Buzz' if only by {b}, else str(n)", ref, solve,
                 [(a * b,), (a,), (b,), (a * b + 1,), (rng.randint(1, 100),), (rng.randint(1, 100),)])


def _factorial(rng):
    return _Spec("factorial(n)", "returns n! for an integer n >= 0 (factorial(0) is 1)",
                 "def factorial(n):\n    result = 1\n    for i in range(2, n + 1):\n        result *= i\n"
                 "    return result\n",
                 math.factorial, [(0,), (1,)] + [(rng.randint(2, 15),) for _ in range(3)])


def _sequence(rng):
    t0, t1 = rng.randint(0, 5), rng.randint(1, 5)

    def solve(n):
        a, b = t0, t1
        for _ in range(n):
            a, b = b, a + b
        return a
    return _Spec("term(n)", f"returns term n (counting from 0) of the sequence t(0) = {t0}, t(1) = {t1}, "
                 "t(n) = t(n - 1) + t(n - 2)",
                 f"def term(n):\n    a, b = {t0}, {t1}\n    for _ in range(n):\n        a, b = b, a + b\n"
                 "    return a\n",
                 solve, [(0,), (1,)] + [(rng.randint(2, 25),) for _ in range(3)])


def _sum_powers(rng):
    p = rng.randint(1, 3)
    return _Spec("sum_powers(xs)", f"returns the sum of x ** {p} over the list of integers xs (0 if it is empty)",
                 f"def sum_powers(xs):\n    return sum(x ** {p} for x in xs)\n", lambda xs: sum(x ** p for x in xs),
                 [([],)] + [(_ints(rng, rng.randint(1, 6), -9, 9),) for _ in range(4)])


def _palindrome(rng):
    def case():
        half = _word(rng, "abcAB")
        return (half + half[::-1].swapcase(),) if rng.random() < 0.5 else (half + "x" + half,)
    return _Spec("is_palindrome(s)", "returns True if the string s reads the same backwards when upper and lower "
                 "case are not told apart, else False",
                 "def is_palindrome(s):\n    t = s.lower()\n    return t == t[::-1]\n",
                 lambda s: s.lower() == s.lower()[::-1], [("",), ("ab",)] + [case() for _ in range(4)])


def _count_words(rng):
    def case():
        return ("".join(rng.choice([" ", "  ", "\t", "\n"]) + _word(rng) for _ in range(rng.randint(0, 5))) + " ",)
    return _Spec("count_words(s)", "returns the number of words in the string s; words are separated by any run "
                 "of whitespace", "def count_words(s):\n    return len(s.split())\n", lambda s: len(s.split()),
                 [case() for _ in range(5)])


def _clamp(rng):
    low = rng.randint(-20, 10)
    high = low + rng.randint(1, 30)
    return _Spec("clamp(x)", f"returns the integer x limited to the range [{low}, {high}]",
                 f"def clamp(x):\n    return max({low}, min({high}, x))\n", lambda x: max(low, min(high, x)),
                 [(low,), (high,), (low - 5,), (high + 5,), (rng.randint(low, high),)])


def _gcd(rng):
    def case():
        g = rng.randint(1, 12)
        return g * rng.randint(1, 20), g * rng.randint(1, 20)
    return _Spec("gcd(a, b)", "returns the greatest common divisor of the positive integers a and b",
                 "def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a\n", math.gcd,
                 [case() for _ in range(5)])


def _digit_sum(rng):
    return _Spec("digit_sum(n)", "returns the sum of the decimal digits of the integer n (its sign is ignored)",
                 "def digit_sum(n):\n    return sum(int(d) for d in str(abs(n)))\n",
                 lambda n: sum(int(d) for d in str(abs(n))), [(0,)] + [(rng.randint(-10**6, 10**6),) for _ in range(4)])


def _unique(rng):
    def solve(xs):
        return list(dict.fromkeys(xs))
    return _Spec("unique(xs)", "returns the list xs without repeated items, keeping the first occurrence of each "
                 "in the original order", "def unique(xs):\n    return list(dict.fromkeys(xs))\n", solve,
                 [([],)] + [(_ints(rng, rng.randint(1, 9), 0, 5),) for _ in range(4)])


def _running_sum(rng):
    def solve(xs):
        out, total = [], 0
        for x in xs:
            total += x
            out.append(total)
        return out
    return _Spec("running_sum(xs)", "returns the list of running totals of the list of integers xs "
                 "(item i is xs[0] + ... + xs[i])",
                 "def running_sum(xs):\n    out, total = [], 0\n    for x in xs:\n        total += x\n"
                 "        out.append(total)\n    return out\n", solve,
                 [([],)] + [(_ints(rng, rng.randint(1, 7), -9, 9),) for _ in range(4)])


def _shift_letters(rng):
    k = rng.randint(1, 25)

    def solve(s):
        return "".join(chr((ord(c) - 97 + k) % 26 + 97) if "a" <= c <= "z" else c for c in s)
    return _Spec("shift_letters(s)", f"returns s with every lowercase letter a-z moved {k} places forward in the "
                 "alphabet (wrapping from z back to a); all other characters stay as they are",
                 f"def shift_letters(s):\n    return ''.join(chr((ord(c) - 97 + {k}) % 26 + 97) if 'a' <= c <= 'z' "
                 "else c for c in s)\n", solve,
                 [("",), ("xyz",)] + [(_word(rng, "abcxyzAZ -") + "!",) for _ in range(3)])


TASKS: dict[str, Callable[[random.Random], _Spec]] = {
    "calc": _calc, "extreme": _extreme, "reverse_text": _reverse, "is_multiple": _is_multiple,
    "count_chars": _count_chars, "fizzbuzz": _fizzbuzz, "factorial": _factorial, "sequence": _sequence,
    "sum_powers": _sum_powers, "is_palindrome": _palindrome, "count_words": _count_words, "clamp": _clamp,
    "gcd": _gcd, "digit_sum": _digit_sum, "unique": _unique, "running_sum": _running_sum,
    "shift_letters": _shift_letters,
}


def make_problem(task: str, seed: int | None) -> Problem:
    """The problem for `task`, its parameters and test inputs drawn from `seed`."""
    spec = TASKS[task](random.Random(seed))
    name = spec.signature.split("(")[0]
    tests = tuple(f"assert same({name}({', '.join(map(repr, args))}), {spec.solve(*args)!r})" for args in spec.inputs)
    prompt = (f"Write a Python function `{spec.signature}` that {spec.description}.\n\n"
              "Answer with the complete function in a ```python code block.")
    return Problem(task, prompt, tests, spec.reference)


_FENCE = re.compile(r"```[ \t]*(python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_code(text: str) -> str:
    """The ```python blocks of `text` joined (else any fenced blocks, else the text), after any </think>."""
    text = text.rsplit("</think>", 1)[-1]
    blocks = _FENCE.findall(text)
    chosen = [code for lang, code in blocks if lang] or [code for _, code in blocks]
    return "\n".join(chosen) if chosen else text


class CodeTestsEnv(TextEnv):
    def __init__(self, wall_s: float = 5.0, memory_mb: int = 512, tasks: list[str] | None = None):
        if not wall_s > 0 or memory_mb < 64:
            raise ValueError(f"code_tests needs wall_s > 0 and memory_mb >= 64, got {wall_s}, {memory_mb}")
        unknown = sorted(set(tasks or []) - set(TASKS))
        if unknown or (tasks is not None and not tasks):
            raise ValueError(f"code_tests: unknown or empty tasks {unknown or tasks}; available: {', '.join(TASKS)}")
        self.tasks = list(tasks) if tasks else list(TASKS)
        self.limits = SandboxLimits(wall_s=wall_s, cpu_s=max(1, math.ceil(wall_s)), memory_mb=memory_mb)
        self.problem: Problem | None = None

    def reset(self, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        rng = random.Random(seed)
        task = (options or {}).get("task") or rng.choice(self.tasks)
        if task not in TASKS:
            raise ValueError(f"code_tests.reset: unknown task {task!r}; available: {', '.join(TASKS)}")
        self.problem = make_problem(task, rng.randrange(2**32))
        return [{"role": "user", "content": self.problem.prompt}], {"task": task}

    def step(self, action: str):
        if not isinstance(action, str):
            raise TypeError(f"code_tests.step expects the policy's text (str), got {type(action).__name__}")
        if self.problem is None:
            raise RuntimeError("code_tests.step called before reset")
        result = run_python_tests(extract_code(action), list(self.problem.tests), self.limits)
        info = {"task": self.problem.task, "passed": result.passed, "total": result.total, "reason": result.reason,
                "sandbox_s": round(result.wall_s, 3), "parse_error": int(result.reason == "syntax error")}
        return [], result.reward, True, False, info
