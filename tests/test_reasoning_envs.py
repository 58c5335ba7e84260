"""The reasoning envs (arithmetic, countdown) and their verifiers (reward.math_answer, reward.countdown)."""
from __future__ import annotations

import ast
import threading

import pytest

from envs.builtin.arithmetic import ArithmeticEnv
from envs.builtin.countdown import CountdownEnv
from policies.tokenizer import CHAR_ALPHABET
from reward.countdown import countdown_reward, extract_equation
from reward.math_answer import extract_answer, math_reward, unsafe_to_verify


# ---- reward.math_answer -------------------------------------------------------------------------

@pytest.mark.parametrize("text, answer", [
    ("14", "14"),
    ("so it is 3 and then 14", "14"),
    ("we get \\boxed{3} then \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("answer: 14", "14"),
    ("the answer is 14.", "14"),
    ("final answer: x = 5", "5"),
    ("answer: 14 apples", "14"),
    ("answer:\n -7", "-7"),
    ("3-10", "10"),  # a binary minus is not a sign
    ("no digits here", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize("response, gold, reward", [
    ("14", "14", 1.0),
    ("15", "14", 0.0),
    ("\\boxed{14}", "14", 1.0),
    ("i think \\boxed{13} but no, \\boxed{14}", "14", 1.0),
    ("answer: 14", "14", 1.0),
    ("answer: 14.0", "14", 1.0),
    ("1/2", "0.5", 1.0),
    ("0.5", "1/2", 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("answer: 1,000", "1000", 1.0),
    ("answer: -7", "-7", 1.0),
    ("answer: 7", "-7", 0.0),
    ("i do not know", "3", 0.0),
    ("", "3", 0.0),
])
def test_math_reward_hand_checked(response, gold, reward):
    got, info = math_reward(response, gold)
    assert got == reward
    assert info["exact"] is (reward == 1.0)
    assert all(isinstance(v, (int, float, str, bool)) for v in info.values())


def test_math_reward_format_bonus_only_for_explicit_answers():
    assert math_reward("\\boxed{14}", "14", format_bonus=0.1)[0] == pytest.approx(1.1)
    assert math_reward("answer: 13", "14", format_bonus=0.1)[0] == pytest.approx(0.1)
    assert math_reward("13", "14", format_bonus=0.1)[0] == 0.0


def test_math_reward_numeric_only_refuses_an_expression():
    assert math_reward("answer: (3+4)*2", "14")[0] == 1.0  # math_verify evaluates the expression
    reward, info = math_reward("answer: (3+4)*2", "14", numeric_only=True)
    assert reward == 0.0 and "not a plain number" in info["reason"]


@pytest.mark.parametrize("answer", ["9^9^9", "2**9**9", "9^{9^{9}}", "10^{999999999}", "99999!",
                                    "\\sum_{i=1}^{9} i", "1" * 200])
def test_answers_that_could_hang_sympy_are_not_verified(answer):
    assert unsafe_to_verify(answer) is not None
    reward, info = math_reward(f"\\boxed{{{answer}}}", "5")
    assert reward == 0.0 and info["reason"].startswith("not verified")


@pytest.mark.parametrize("answer", ["14", "\\frac{1}{2}", "x^2+y^2", "2^{10}", "(2**9)**9", "\\sqrt{2}"])
def test_ordinary_answers_are_verified(answer):
    assert unsafe_to_verify(answer) is None


def test_math_reward_works_off_the_main_thread():
    """math_verify's default timeouts use signal.alarm, which raises in a worker thread."""
    results, errors = [], []

    def worker():
        try:
            results.append(math_reward("\\boxed{1/2}", "0.5")[0])
            results.append(math_reward("answer: 15", "14")[0])
            results.append(math_reward("\\boxed{2**9**9}", "5")[0])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive() and not errors
    assert results == [1.0, 0.0, 0.0]


# ---- arithmetic ---------------------------------------------------------------------------------

def _prompt(obs) -> str:
    assert isinstance(obs, list) and obs[0]["role"] == "user"
    return obs[0]["content"]


def test_arithmetic_is_deterministic_per_seed():
    env_a, env_b = ArithmeticEnv(max_terms=4), ArithmeticEnv(max_terms=4)
    for seed in range(20):
        assert env_a.reset(seed=seed) == env_b.reset(seed=seed)
    assert len({_prompt(env_a.reset(seed=s)[0]) for s in range(50)}) > 20


def test_arithmetic_prompts_use_only_the_tiny_alphabet_and_gold_is_correct():
    env = ArithmeticEnv(min_terms=1, max_terms=6, max_value=20)
    for seed in range(300):
        obs, info = env.reset(seed=seed)
        prompt = _prompt(obs)
        assert set(prompt) <= set(CHAR_ALPHABET), prompt
        expression = prompt.removeprefix("compute: ").removesuffix(". answer with the number.")
        assert expression == info["expression"]
        tree = ast.parse(expression, mode="eval")
        allowed = (ast.Expression, ast.BinOp, ast.Constant, ast.Add, ast.Sub, ast.Mult)
        assert all(isinstance(node, allowed) for node in ast.walk(tree)), expression
        assert int(info["gold"]) == eval(compile(tree, "<expr>", "eval"), {"__builtins__": {}})


def test_arithmetic_hand_checked_rendering():
    from envs.builtin.arithmetic import _Node, _evaluate, _render

    leaf = lambda v: _Node(value=v)  # noqa: E731
    a_minus_b_plus_c = _Node(op="-", left=leaf(9), right=_Node(op="+", left=leaf(2), right=leaf(3)))
    assert _render(a_minus_b_plus_c) == "9-(2+3)" and _evaluate(a_minus_b_plus_c) == 4
    sum_times = _Node(op="*", left=_Node(op="+", left=leaf(3), right=leaf(4)), right=leaf(2))
    assert _render(sum_times) == "(3+4)*2" and _evaluate(sum_times) == 14


def test_arithmetic_rewards():
    env = ArithmeticEnv()
    obs, info = env.reset(seed=3)
    gold = int(info["gold"])
    obs, reward, terminated, truncated, step_info = env.step(str(gold))
    assert obs == [] and reward == 1.0 and terminated and not truncated
    assert step_info == {"gold": str(gold), "answer": str(gold), "exact": True, "reason": "correct",
                         "parse_error": 0}
    assert env.step(f"let me think. \\boxed{{{gold}}}")[1] == 1.0
    assert env.step(f"answer: {gold + 1}")[1] == 0.0
    assert env.step(f"answer: {info['expression']}")[1] == 0.0  # echoing the question is no answer
    assert env.step("")[1] == 0.0


def test_arithmetic_rejects_bad_input():
    with pytest.raises(TypeError, match="arithmetic.step"):
        ArithmeticEnv().step(14)
    with pytest.raises(ValueError, match="min_terms"):
        ArithmeticEnv(min_terms=3, max_terms=2)
    with pytest.raises(ValueError, match="operators"):
        ArithmeticEnv(operators="+/")
    with pytest.raises(ValueError, match="expression"):
        ArithmeticEnv(prompt="compute this")


# ---- countdown ----------------------------------------------------------------------------------

def test_countdown_every_problem_is_solvable_and_prompts_are_tiny_alphabet():
    env = CountdownEnv()
    for seed in range(200):
        obs, info = env.reset(seed=seed)
        prompt = _prompt(obs)
        assert set(prompt) <= set(CHAR_ALPHABET), prompt
        assert f"make {info['target']}." in prompt and info["numbers"] in prompt
        assert len(env.numbers) == 3 and all(1 <= n <= 25 for n in env.numbers)
        assert 0 < info["target"] and info["target"] not in env.numbers
        _, reward, _, _, step_info = env.step(env.witness)
        assert reward == 1.0 and step_info["exact"], (seed, env.numbers, env.target, env.witness, step_info)


def test_countdown_use_all_witness_uses_every_number():
    env = CountdownEnv(num_numbers=4, use_all=True)
    for seed in range(100):
        env.reset(seed=seed)
        assert env.step(env.witness)[1] == 1.0, (env.numbers, env.target, env.witness)


def test_countdown_is_deterministic_per_seed():
    assert CountdownEnv().reset(seed=11) == CountdownEnv().reset(seed=11)
    assert len({CountdownEnv().reset(seed=s)[1]["target"] for s in range(30)}) > 10


@pytest.mark.parametrize("response, reward, reason", [
    ("25+7*3", 1.0, "correct"),
    ("answer: 25 + 7 * 3 = 46.", 1.0, "correct"),
    ("46 = 25+7*3", 1.0, "correct"),
    ("\\boxed{25 + 7 \\times 3}", 1.0, "correct"),
    ("so i think 25+7*3 works", 1.0, "correct"),
    ("(25-7)*3-8", 0.0, "not one of the given numbers"),
    ("answer: 3+7", 0.1, "valid equation but equals 10"),
    ("7*7-3", 0.0, "number 7 used more times than given"),
    ("25+21", 0.0, "number 21 is not one of the given numbers"),
    ("2**10", 0.0, "disallowed syntax: Pow"),
    ("25**1", 0.0, "disallowed syntax: Pow"),
    ("a+3", 0.0, "disallowed syntax: Name"),
    ("abs(3)-7", 0.0, "disallowed syntax: Call"),
    ("3.0*7+25", 0.0, "only whole numbers"),
    ("25 < 46", 0.0, "disallowed syntax: Compare"),
    ("i give up", 0.0, "no equation found"),
])
def test_countdown_reward_hand_checked(response, reward, reason):
    got, info = countdown_reward(response, [3, 7, 25], 46)
    assert got == pytest.approx(reward) and reason in info["reason"], info
    assert info["exact"] is (reward == 1.0)
    assert all(isinstance(v, (int, float, str, bool)) for v in info.values())


def test_countdown_exact_fractions_and_division_by_zero():
    assert countdown_reward("7/2*4", [7, 2, 4], 14)[0] == 1.0  # 3.5 * 4, computed exactly
    assert countdown_reward("(7-2)/4", [7, 2, 4], 1)[1]["value"] == "5/4"
    reward, info = countdown_reward("3/(7-7)", [3, 7, 7], 1)
    assert reward == 0.0 and info["reason"] == "division by zero"


def test_countdown_use_all_requires_every_number():
    assert countdown_reward("25+21", [25, 21, 4], 46)[0] == 1.0
    reward, info = countdown_reward("25+21", [25, 21, 4], 46, use_all=True)
    assert reward == 0.0 and info["reason"] == "not every number was used"
    assert countdown_reward("25+21+4-4", [25, 21, 4, 4], 46, use_all=True)[0] == 1.0


def test_countdown_never_executes_the_reply(tmp_path):
    marker = tmp_path / "executed"
    for response in [f"__import__('os').mkdir('{marker}')", f"answer: open('{marker}', 'w')",
                     f"\\boxed{{__import__('pathlib').Path('{marker}').touch()}}"]:
        reward, info = countdown_reward(response, [3, 7, 25], 46)
        assert reward == 0.0 and info["reason"].startswith("disallowed syntax"), info
    assert not marker.exists()


def test_countdown_equation_extraction():
    assert extract_equation("answer:\n(3 + 7) * 2 = 20") == "(3 + 7) * 2"
    assert extract_equation("\\boxed{\\frac{25}{5} + 3}") == "(25)/(5) + 3"
    assert extract_equation("nothing") is None


def test_countdown_rejects_bad_input():
    env = CountdownEnv()
    env.reset(seed=0)
    with pytest.raises(TypeError, match="countdown.step"):
        env.step(None)
    with pytest.raises(ValueError, match="num_numbers"):
        CountdownEnv(num_numbers=1)
    with pytest.raises(ValueError, match="max_target"):
        CountdownEnv(num_numbers=3, max_number=100, max_target=10)
    with pytest.raises(ValueError, match="prompt"):
        CountdownEnv(prompt="make {target}")
