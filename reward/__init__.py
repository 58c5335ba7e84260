"""Reward functions and verifiers, called by environments (pure functions of text)."""
from reward.string_match import copy_score

__all__ = ["copy_score"]
