"""cdpctl reads a journey YAML file as the service does: `on`, `off`, `yes`, `no`, `y`, `n` are words, not
YAML 1.1 booleans - a journey whose id is such a word is found by its id (`journey apply` names it)."""

from __future__ import annotations

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdpctl.journeys import _journey_id_of


def test_a_journey_id_that_yaml_1_1_would_read_as_a_boolean_is_read_as_written():
    text = "id: off\nentry: {segment: vip, on: entered}\nnodes: []\n"
    assert _journey_id_of(pb.JourneyDefinition(yaml=text), "off.yaml") == "off"
    assert _journey_id_of(pb.JourneyDefinition(yaml="id: yes\n"), "yes.yaml") == "yes"
