"""calculator: a multi-turn tool-use task. The policy gets an arithmetic question and a
`calculator` tool (Qwen3.5 tool-call format, see `envs.tools`); it may call the tool, read the
result, and must then answer with the number. Reward: `call_reward` for a turn with well-formed
tool calls, plus 1.0 for the right final answer."""
from __future__ import annotations

import ast
import operator
import re
from fractions import Fraction

from envs.tools import ToolEnv, function_schema

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


def safe_arithmetic(expression: str, max_chars: int = 200) -> Fraction:
    """Evaluate + - * / and parentheses over numbers, exactly; anything else raises ValueError."""
    if len(expression) > max_chars:
        raise ValueError(f"expression longer than {max_chars} characters")
    tree = ast.parse(expression.strip(), mode="eval")

    def ev(node) -> Fraction:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            if abs(node.value) > 10**12:
                raise ValueError("number too large")
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ValueError("division by zero")
            return _OPS[type(node.op)](left, right)
        raise ValueError(f"only numbers, + - * / and parentheses are allowed (got {type(node).__name__})")

    return ev(tree)


def format_number(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{float(value):.6g}"


def calculator(expression: str) -> str:
    return format_number(safe_arithmetic(str(expression)))


class CalculatorEnv(ToolEnv):
    tools = {"calculator": calculator}
    tool_schemas = [function_schema("calculator", "evaluate an arithmetic expression (+ - * / and parentheses)",
                                    {"expression": ("string", "the expression, e.g. (12+7)*3")})]

    def __init__(self, min_value: int = 10, max_value: int = 99, num_terms: int = 3, max_tool_turns: int = 2,
                 call_reward: float = 0.1, prompt: str = "what is {expression}? use the calculator tool, then answer with the number."):
        super().__init__(max_tool_turns=max_tool_turns, call_reward=call_reward)
        if not 0 <= min_value <= max_value:
            raise ValueError(f"calculator needs 0 <= min_value <= max_value, got {min_value}, {max_value}")
        if num_terms < 2:
            raise ValueError(f"calculator needs num_terms >= 2, got {num_terms}")
        self.min_value, self.max_value, self.num_terms, self.prompt = min_value, max_value, num_terms, prompt
        self.gold = ""

    def make_task(self, rng):
        terms = [str(rng.randint(self.min_value, self.max_value)) for _ in range(self.num_terms)]
        expression = terms[0]
        for t in terms[1:]:
            expression += rng.choice(["+", "-", "*"]) + t
        self.gold = calculator(expression)
        return [{"role": "user", "content": self.prompt.format(expression=expression)}], {"gold": self.gold}

    def score_answer(self, text: str):
        numbers = _NUMBER.findall(text)
        answer = numbers[-1] if numbers else ""
        exact = bool(answer) and answer == self.gold
        return (1.0 if exact else 0.0), {"gold": self.gold, "answer": answer, "exact": exact,
                                         "parse_error": int(not answer)}
