"""Every per-stream lifecycle: what each table allows, and that nothing leaves a final state."""

import pytest

from ltcp.balancer import DIAL, DialState
from ltcp.connector import CONNECT, ConnectState
from ltcp.duplex import READING, WRITING
from ltcp.endpoint import ENDPOINT
from ltcp.intake import INTAKE, IntakeState
from ltcp.lifecycle import IllegalMove

LIFECYCLES = [ENDPOINT, DIAL, INTAKE, CONNECT, READING, WRITING]
FINAL = {DialState.ESTABLISHED, DialState.FAILED, IntakeState.ROUTED, IntakeState.FAILED, ConnectState.DONE}


@pytest.mark.parametrize("lifecycle", LIFECYCLES, ids=lambda lifecycle: lifecycle.name)
def test_every_move_leads_to_a_state_and_final_states_allow_none(lifecycle):
    events = {event for moves in lifecycle.table.values() for event in moves}
    targets = {target for moves in lifecycle.table.values() for target in moves.values()}
    for state in targets - set(lifecycle.table):
        for event in events:
            with pytest.raises(IllegalMove):
                lifecycle.move(state, event)
    assert not (FINAL & set(lifecycle.table))


def test_a_second_failure_of_a_dial_is_refused():
    """Once it pushed balancer.dials negative with no signal."""
    state = DIAL.move(DIAL.move(DialState.NEW, "connect"), "fail")
    with pytest.raises(IllegalMove, match="Dial: no move 'fail' from failed"):
        DIAL.move(state, "fail")


def test_the_tables_describe_themselves():
    assert DIAL.describe().splitlines()[:3] == ["| Dial state | event | next state |", "|---|---|---|",
                                                "| new | wait | waiting |"]
