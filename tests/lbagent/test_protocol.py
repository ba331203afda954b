"""Protocol 1 messages: every message round-trips, anything else is a ProtocolError whose text
says what was wrong; fuzzed frames never raise anything but ProtocolError."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbagent.protocol import (
    MAX_AGENT_MESSAGE_BYTES,
    Applied,
    BackendHealth,
    DeltaBaseMismatch,
    Desired,
    Health,
    Hello,
    InvalidDesiredState,
    ProtocolError,
    Stats,
    decode_agent_message,
    decode_portal_message,
    encode,
)
from lbagent.state import parse_state
from tests.lbagent.test_state import example_document


@pytest.mark.parametrize(
    "message",
    [
        Hello(node="mux-a", role="mux", version="0.1.0", applied_generation=None),
        Hello(node="host-1", role="host", version="0.1.0+dev", applied_generation=42),
        Applied(generation=3, ok=True, listeners={12: 5, 7: 1}),
        Applied(generation=4, ok=False, error="nft: map dips: out of memory"),
        Applied(generation=5, ok=True, listeners={12: 0, 7: 1}, listener_errors={12: "VIP 203.0.113.10: x"}),
        Stats(counters={"packets": 10, "records": 0, "peer.queries": 3}),
        Health(checks=(BackendHealth(12, "10.1.0.5", 80, False, "connect refused"),), full=True),
        Health(checks=()),
    ],
)
def test_agent_messages_round_trip(message) -> None:
    assert decode_agent_message(encode(message)) == message


def test_desired_round_trips_and_carries_a_valid_state() -> None:
    message = Desired(state=parse_state(example_document()))
    decoded = decode_portal_message(encode(message))
    assert decoded == message
    assert decoded.state.generation == 17


@pytest.mark.parametrize(
    ("frame", "fragment"),
    [
        (b'{"type":"hello"}', "binary frames"),
        ("[1]", "JSON object"),
        ("{", "not valid JSON"),
        ('{"type":"hello","protocol":2,"node":"a","role":"mux","version":"1"}', "unsupported protocol 2"),
        ('{"type":"bye","protocol":1}', "unknown agent message type 'bye'"),
        ('{"type":"hello","protocol":1,"node":"a","role":"router","version":"1"}', "hello.role"),
        ('{"type":"hello","protocol":1,"node":"a b","role":"mux","version":"1"}', "hello.node"),
        ('{"type":"hello","protocol":1,"role":"mux","version":"1"}', "hello.node: missing"),
        ('{"type":"hello","protocol":1,"node":"a","role":"mux","version":"1","x":1}', "hello.x: unknown"),
        ('{"type":"applied","protocol":1,"generation":-1,"ok":true}', "applied.generation"),
        ('{"type":"applied","protocol":1,"generation":1,"ok":false}', "must say why"),
        ('{"type":"applied","protocol":1,"generation":1,"ok":true,"listeners":{"x":1}}', "listener ids"),
        ('{"type":"applied","protocol":1,"generation":1,"ok":true,"listeners":{"\u00b2":1}}', "listener ids"),
        ('{"type":"applied","protocol":1,"generation":1,"ok":true,"listeners":{"012":1}}', "listener ids"),
        (
            '{"type":"applied","protocol":1,"generation":1,"ok":true,"listeners":{"1":1},"listener_errors":{"2":"x"}}',
            "applied.listener_errors: '2' is not a listener this message lists",
        ),
        (
            '{"type":"applied","protocol":1,"generation":1,"ok":true,"listeners":{"1":1},"listener_errors":{"1":5}}',
            "applied.listener_errors.1",
        ),
        (
            '{"type":"applied","protocol":1,"generation":1,"ok":true,"listeners":{"1":1},"listener_errors":[]}',
            "applied.listener_errors: expected an object",
        ),
        ('{"type":"stats","protocol":1,"counters":{"Bad Name":1}}', "bad counter name"),
        ('{"type":"stats","protocol":1,"counters":{"a":-5}}', "stats.counters.a"),
        (
            '{"type":"health","protocol":1,"checks":[{"listener":1,"address":"x","port":1,"healthy":true}]}',
            "health.checks[0].address",
        ),
        (
            '{"type":"health","protocol":1,"checks":[{"listener":1,"address":"10.0.0.1","port":1,"healthy":1}]}',
            "health.checks[0].healthy",
        ),
    ],
)
def test_bad_agent_frames_are_refused_with_a_reason(frame, fragment) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_agent_message(frame)
    assert fragment in str(caught.value)


def test_oversized_agent_frame_is_refused_before_parsing() -> None:
    frame = json.dumps({"type": "stats", "protocol": 1, "counters": {}, "pad": "x" * MAX_AGENT_MESSAGE_BYTES})
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decode_agent_message(frame)


def test_invalid_state_in_desired_keeps_generation_for_a_failed_ack() -> None:
    doc = example_document()
    doc["vips"][0]["listeners"][0]["port"] = 0
    with pytest.raises(InvalidDesiredState) as caught:
        decode_portal_message(json.dumps({"type": "desired", "protocol": 1, "state": doc}))
    assert caught.value.generation == 17
    assert "vips[0].listeners[0].port" in str(caught.value)


def test_portal_frame_types_other_than_desired_are_refused() -> None:
    with pytest.raises(ProtocolError, match="expected desired"):
        decode_portal_message('{"type":"hello","protocol":1}')


frames = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=10,
)
typed_frames = st.builds(
    lambda kind, rest: {**rest, "type": kind, "protocol": 1},
    st.sampled_from(["hello", "applied", "stats", "health", "desired", "x"]),
    st.dictionaries(
        st.sampled_from(
            [
                "node",
                "role",
                "version",
                "applied_generation",
                "generation",
                "ok",
                "error",
                "listeners",
                "counters",
                "checks",
                "full",
                "state",
            ]
        ),
        frames,
        max_size=5,
    ),
)


@settings(max_examples=150, deadline=None)
@given(typed_frames | frames, st.booleans())
def test_fuzzed_frames_raise_only_protocol_error(body, to_portal) -> None:
    text = json.dumps(body)
    decode = decode_portal_message if to_portal else decode_agent_message
    reason = "decoded"
    try:
        decode(text)
    except ProtocolError as exc:
        reason = str(exc)
    assert reason  # a refusal always carries a reason to log and close with


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=300) | st.binary(max_size=300))
def test_fuzzed_raw_text_raises_only_protocol_error(text) -> None:
    with pytest.raises(ProtocolError):
        decode_agent_message(text)


def _delta(base: int, vips: list, removed: list, generation: int = 18) -> str:
    state = example_document()
    state["generation"] = generation
    state["vips"] = vips
    return json.dumps({"type": "delta", "protocol": 1, "base": base, "removed": removed, "state": state})


def test_delta_merges_changed_and_removed_vips_into_the_received_state() -> None:
    base = example_document()
    base["vips"].append(
        {
            **copy.deepcopy(base["vips"][0]),
            "address": "203.0.113.20",
            "listeners": [dict(base["vips"][0]["listeners"][0], id=13)],
        }
    )
    new_vip = {
        **copy.deepcopy(base["vips"][0]),
        "address": "198.51.100.1",
        "listeners": [dict(base["vips"][0]["listeners"][0], id=14)],
    }
    message = decode_portal_message(_delta(17, [new_vip], ["203.0.113.20"]), base=(17, base))
    assert message.state.generation == 18
    assert [v.address for v in message.state.vips] == ["198.51.100.1", "203.0.113.10"]  # portal order
    assert message.raw["vips"][1] == base["vips"][0]


def test_delta_against_another_generation_asks_for_a_resync() -> None:
    with pytest.raises(DeltaBaseMismatch, match="holds 16"):
        decode_portal_message(_delta(17, [], []), base=(16, example_document()))
    with pytest.raises(DeltaBaseMismatch, match="holds nothing"):
        decode_portal_message(_delta(17, [], []))
    with pytest.raises(ProtocolError, match=r"delta\.removed"):
        decode_portal_message(
            json.dumps(
                {"type": "delta", "protocol": 1, "base": 17, "removed": "x", "state": example_document()}
            ),
            base=(17, example_document()),
        )
