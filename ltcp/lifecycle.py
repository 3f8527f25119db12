"""Lifecycles as data: the states of each per-stream object and the moves between them.

A ``Lifecycle`` is a table ``{state: {event: next state}}``.  ``move`` finds
the one move an event makes from a state and refuses any other with
``IllegalMove``, so a late callback or a second ``fail()`` is caught where it
happens instead of silently corrupting a count (h11's ``_state.py`` is the
model).  Counts that follow a lifecycle change only on its moves.
"""

__all__ = ["IllegalMove", "Lifecycle"]


class IllegalMove(RuntimeError):
    """An event that the object's current state does not allow: a bug."""


class Lifecycle:
    __slots__ = ("name", "table")

    def __init__(self, name, table):
        self.name = name
        self.table = table

    def move(self, state, event):
        """The state ``event`` leads to from ``state``; IllegalMove if it leads nowhere."""
        try:
            return self.table[state][event]
        except KeyError:
            raise IllegalMove(f"{self.name}: no move {event!r} from {state.name.lower()}") from None

    def describe(self):
        """The table in Markdown, for documentation."""
        lines = [f"| {self.name} state | event | next state |", "|---|---|---|"]
        for state, moves in self.table.items():
            for event, target in moves.items():
                lines.append(f"| {state.name.lower()} | {event} | {target.name.lower()} |")
        return "\n".join(lines)
