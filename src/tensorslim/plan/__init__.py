"""Plans: which layer gets which method (rules now; budgets and the solver come next)."""

from .rules import Plan, Rule

__all__ = ["Plan", "Rule"]
