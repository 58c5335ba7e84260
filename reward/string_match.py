"""String-matching rewards."""
from __future__ import annotations


def copy_score(answer: str, target: str, digit_bonus: float = 0.1, length_bonus: float = 0.2) -> float:
    """Partial credit for reproducing `target`; 1.0 only for the exact answer:

    digit_bonus * (share of digits among the first len(target) characters)
    + (1 - digit_bonus - length_bonus) * (share of target positions matched)
    + length_bonus / (1 + |len(answer) - len(target)|)
    """
    if not answer:
        return 0.0
    n = len(target)
    digits = sum(c.isdigit() for c in answer[:n]) / n
    accuracy = sum(a == t for a, t in zip(answer, target)) / n
    length = 1.0 / (1 + abs(len(answer) - n))
    return digit_bonus * digits + (1.0 - digit_bonus - length_bonus) * accuracy + length_bonus * length
