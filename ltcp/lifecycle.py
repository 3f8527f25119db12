"""Lifecycles as data: the states of each per-stream object and the moves between them.

Each ``State`` carries its moves, ``{event: next state}``; a ``Lifecycle``
fills them from one table.  An object moves with
``self.state = self.state.moves[event]``: a plain dictionary lookup, and an
event the state does not allow raises ``IllegalMove``, so a late callback or
a second ``fail()`` is caught where it happens instead of silently corrupting
a count (h11's ``_state.py`` is the model).  Counts that follow a lifecycle
change only on its moves.
"""

__all__ = ["IllegalMove", "Lifecycle", "State"]


class IllegalMove(RuntimeError):
    """An event that the object's current state does not allow: a bug."""


class _Moves(dict):
    """A state's moves; looking up one it does not have raises IllegalMove."""

    __slots__ = ("state",)

    def __init__(self, state):
        super().__init__()
        self.state = state

    def __missing__(self, event):
        raise IllegalMove(f"{self.state.lifecycle}: no move {event!r} from {self.state.name}")


class State:
    """One state of a lifecycle; compared by identity, hashed by identity (cheaply)."""

    __slots__ = ("name", "moves", "lifecycle")

    def __init__(self, name):
        self.name = name
        self.moves = _Moves(self)
        self.lifecycle = ""

    def __repr__(self):
        return f"<{self.lifecycle} {self.name}>"


class Lifecycle:
    """The table of moves of one kind of object, written once and installed in its states."""

    __slots__ = ("name", "table")

    def __init__(self, name, table):
        self.name = name
        self.table = table
        for state, moves in table.items():
            state.moves.update(moves)
        for state in {*table, *(target for moves in table.values() for target in moves.values())}:
            state.lifecycle = name

    def states(self):
        """Every state, in the order the table names them."""
        return list(dict.fromkeys([*self.table, *(t for moves in self.table.values() for t in moves.values())]))

    def describe(self):
        """The table in Markdown, for documentation."""
        lines = [f"| {self.name} state | event | next state |", "|---|---|---|"]
        for state, moves in self.table.items():
            for event, target in moves.items():
                lines.append(f"| {state.name} | {event} | {target.name} |")
        return "\n".join(lines)
