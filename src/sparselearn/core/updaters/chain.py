"""``chain(a, b, ...)``: several update rules on one sparsifier, in order.

For compositions such as a SNIP mask followed by RigL's dynamic phase, or a gradual pruning era
followed by a prune-regrow phase. Each rule keeps its own trigger; at a step where several are due
they run in the order given, each seeing the masks the previous one left.
"""
from __future__ import annotations


class Chain:
    """The updaters ``rules`` run in order; see the module docstring."""

    def __init__(self, *rules):
        if not rules:
            raise ValueError("chain() needs at least one update rule")
        self.rules = list(rules)
        self._due: list[bool] = []

    @property
    def needs(self) -> frozenset:
        out = frozenset()
        for r in self.rules:
            out |= getattr(r, "needs", frozenset())
        return out

    def needs_dense_grad(self, step: int) -> bool:
        return any(getattr(r, "needs_dense_grad", lambda s: True)(step) for r in self.rules)

    def attach(self, sparsifier) -> None:
        for r in self.rules:
            if hasattr(r, "attach"):
                r.attach(sparsifier)

    def due(self, step: int) -> bool:
        # ask every rule exactly once per step: some triggers advance their state when asked
        self._due = [r.due(step) for r in self.rules]
        return any(self._due)

    def __call__(self, sparsifier, step: int) -> dict:
        stats = {}
        for i, (rule, due) in enumerate(zip(self.rules, self._due)):
            if due:
                stats[str(i)] = rule(sparsifier, step) or {}
        return stats

    def state_dict(self) -> dict:
        return {"rules": [r.state_dict() for r in self.rules]}

    def load_state_dict(self, state: dict) -> None:
        for r, s in zip(self.rules, (state or {}).get("rules", [])):
            r.load_state_dict(s)


def chain(*rules) -> Chain:
    """Runs ``rules`` in order on one sparsifier (see :class:`Chain`)."""
    return Chain(*rules)
