"""Every per-stream lifecycle: what each table allows, and that nothing leaves a final state."""

import pytest

from ltcp.balancer import connector, dial
from ltcp.dataplane import intake
from ltcp.balancer.connector import CONNECT
from ltcp.dataplane.duplex import READING, WRITING
from ltcp.balancer.endpoint import ENDPOINT
from ltcp.dataplane.intake import INTAKE
from ltcp.lifecycle import IllegalMove

LIFECYCLES = [ENDPOINT, dial.DIAL, INTAKE, CONNECT, READING, WRITING]
FINAL = {dial.ESTABLISHED, dial.FAILED, intake.ROUTED, intake.FAILED, connector.DONE}


@pytest.mark.parametrize("lifecycle", LIFECYCLES, ids=lambda lifecycle: lifecycle.name)
def test_every_move_leads_to_a_state_and_final_states_allow_none(lifecycle):
    events = {event for moves in lifecycle.table.values() for event in moves}
    for state in lifecycle.states():
        assert state.lifecycle == lifecycle.name
        for event in events - set(lifecycle.table.get(state, {})):
            with pytest.raises(IllegalMove, match=f"{lifecycle.name}: no move '{event}' from {state.name}"):
                state.moves[event]
    assert not any(state.moves for state in FINAL)


def test_a_second_failure_of_a_dial_is_refused():
    """Once it pushed balancer.dials negative with no signal."""
    state = dial.NEW.moves["connect"].moves["fail"]
    with pytest.raises(IllegalMove, match="Dial: no move 'fail' from failed"):
        state.moves["fail"]


def test_the_tables_describe_themselves():
    assert dial.DIAL.describe().splitlines()[:3] == ["| Dial state | event | next state |", "|---|---|---|",
                                                "| new | wait | waiting |"]
