"""The desired-state document: valid documents round-trip exactly, bad ones are refused with an
error naming the offending path, and nothing thrown at the parser escapes as anything else."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbagent.state import DesiredState, StateError, StateParser, load_state_file, parse_state

PEER_KEY = "11" * 32
REDIRECT_KEY = "22" * 32


def example_document() -> dict:
    return {
        "version": 1,
        "generation": 17,
        "node": "mux-a",
        "cluster": {
            "hash_seed": 24301,
            "table_size": 65537,
            "owner_seed": 7919,
            "muxes": [
                {"name": "mux-a", "address": "10.0.0.2", "peer_port": 4790},
                {"name": "mux-b", "address": "10.0.0.3", "peer_port": 4790},
            ],
            "peer_key": PEER_KEY,
            "redirect_key": REDIRECT_KEY,
            "max_records": 100000,
        },
        "vips": [
            {
                "address": "203.0.113.10",
                "bypass": False,
                "bypass_next_hop": None,
                "fast_path": False,
                "listeners": [
                    {
                        "id": 12,
                        "protocol": "tcp",
                        "port": 80,
                        "generation": 5,
                        "drain_timeout_s": 30,
                        "backends": [
                            {
                                "address": "10.1.0.5",
                                "port": 80,
                                "weight": 1,
                                "state": "active",
                                "mac": None,
                                "host": "web-1",
                            },
                            {
                                "address": "10.1.0.6",
                                "port": 80,
                                "weight": 2,
                                "state": "draining",
                                "mac": "52:54:00:12:34:56",
                                "host": None,
                            },
                        ],
                        "previous": {
                            "generation": 4,
                            "backends": [
                                {
                                    "address": "10.1.0.5",
                                    "port": 80,
                                    "weight": 1,
                                    "state": "active",
                                    "mac": None,
                                    "host": "web-1",
                                }
                            ],
                            "drain_deadline": 1790000000.0,
                        },
                        "health_check": {
                            "kind": "http",
                            "path": "/healthz",
                            "interval_s": 2.0,
                            "timeout_s": 1.0,
                            "rise": 2,
                            "fall": 2,
                        },
                    }
                ],
            }
        ],
    }


def test_example_document_parses_into_frozen_state_and_round_trips() -> None:
    state = parse_state(example_document())
    assert state.generation == 17
    assert state.cluster.muxes[1].name == "mux-b"
    assert state.cluster.peer_key == bytes.fromhex(PEER_KEY)
    listener = state.vips[0].listeners[0]
    assert listener.previous is not None
    assert listener.previous.generation == 4
    assert listener.backends[1].mac == "52:54:00:12:34:56"
    assert state.listener_generations() == {12: 5}
    assert state.to_dict() == example_document()
    assert parse_state(state.to_json()) == state
    with pytest.raises(AttributeError):
        state.generation = 18  # type: ignore[misc]


def test_keys_are_not_shown_in_repr() -> None:
    assert PEER_KEY not in repr(parse_state(example_document()))


def test_optional_fields_take_documented_defaults() -> None:
    doc = example_document()
    listener = doc["vips"][0]["listeners"][0]
    for key in ("drain_timeout_s", "previous", "health_check"):
        del listener[key]
    listener["backends"] = [{"address": "10.1.0.5", "port": 8080}]
    del doc["vips"][0]["bypass"]
    state = parse_state(doc)
    parsed = state.vips[0].listeners[0]
    assert (parsed.drain_timeout_s, parsed.previous, parsed.health_check) == (30, None, None)
    assert (parsed.backends[0].weight, parsed.backends[0].state) == (1, "active")
    assert state.vips[0].bypass is False


def test_addresses_are_canonicalised() -> None:
    doc = example_document()
    doc["vips"][0]["address"] = "2001:DB8::0:1"
    listener = doc["vips"][0]["listeners"][0]
    listener["previous"] = None
    listener["backends"] = [{"address": "2001:db8:0::5", "port": 80}]
    state = parse_state(doc)
    assert state.vips[0].address == "2001:db8::1"
    assert state.vips[0].listeners[0].backends[0].address == "2001:db8::5"


def _set(doc: dict, path: list, value: object) -> dict:
    target = doc
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return doc


_DELETE = object()
L0 = ["vips", 0, "listeners", 0]


@pytest.mark.parametrize(
    ("path", "value", "error_path", "fragment"),
    [
        (["version"], 2, "version", "expected 1"),
        (["generation"], -1, "generation", "got -1"),
        (["generation"], True, "generation", "got True"),
        (["node"], "", "node", "expected a name"),
        (["cluster", "table_size"], 65536, "cluster.table_size", "prime"),
        (["cluster", "peer_key"], "abc", "cluster.peer_key", "hex"),
        (["cluster", "redirect_key"], "00" * 4, "cluster.redirect_key", "got 4"),
        (["cluster", "muxes", 1, "name"], "mux-a", "cluster.muxes[1]", "duplicate mux name"),
        (["cluster", "muxes", 0, "peer_port"], 0, "cluster.muxes[0].peer_port", "1..65535"),
        (["vips", 0, "address"], "203.0.113.300", "vips[0].address", "'203.0.113.300'"),
        (["vips", 0, "bypass"], True, "vips[0].bypass_next_hop", "bypass is true"),
        (["vips", 0, "fast_path"], "yes", "vips[0].fast_path", "true or false"),
        ([*L0, "protocol"], "sctp", "vips[0].listeners[0].protocol", "tcp, udp"),
        ([*L0, "port"], 70000, "vips[0].listeners[0].port", "got 70000"),
        ([*L0, "id"], _DELETE, "vips[0].listeners[0].id", "missing"),
        ([*L0, "colour"], "red", "vips[0].listeners[0].colour", "unknown field"),
        ([*L0, "backends", 1, "port"], 80.5, "vips[0].listeners[0].backends[1].port", "80.5"),
        (
            [*L0, "backends", 1, "address"],
            "10.1.0.5",
            "vips[0].listeners[0].backends[1]",
            "duplicate backend",
        ),
        ([*L0, "backends", 0, "address"], "2001:db8::1", "vips[0].listeners[0].backends[0].address", "IPv4"),
        ([*L0, "backends", 0, "weight"], 70000, "vips[0].listeners[0].backends[0].weight", "0..65535"),
        ([*L0, "backends", 0, "state"], "up", "vips[0].listeners[0].backends[0].state", "active, draining"),
        ([*L0, "backends", 0, "mac"], "52:54:00", "vips[0].listeners[0].backends[0].mac", "MAC"),
        ([*L0, "previous", "generation"], 5, "vips[0].listeners[0].previous.generation", "older"),
        (
            [*L0, "previous", "drain_deadline"],
            float("nan"),
            "vips[0].listeners[0].previous.drain_deadline",
            "finite",
        ),
        ([*L0, "health_check", "kind"], "icmp", "vips[0].listeners[0].health_check.kind", "tcp, http"),
        ([*L0, "health_check", "path"], "healthz", "vips[0].listeners[0].health_check.path", "'/'"),
        ([*L0, "health_check", "timeout_s"], 5, "vips[0].listeners[0].health_check.timeout_s", "interval_s"),
        ([*L0, "health_check", "interval_s"], 0, "vips[0].listeners[0].health_check.interval_s", "> 0"),
        ([*L0, "health_check", "rise"], 0, "vips[0].listeners[0].health_check.rise", "1..100"),
        (["vips"], {"a": 1}, "vips", "expected a list"),
    ],
)
def test_bad_field_is_refused_naming_path_and_value(path, value, error_path, fragment) -> None:
    with pytest.raises(StateError) as caught:
        parse_state(_set(example_document(), path, value))
    assert caught.value.path.startswith(error_path), str(caught.value)
    assert fragment in str(caught.value)


def test_duplicate_vip_and_listener_are_refused() -> None:
    doc = example_document()
    doc["vips"].append(copy.deepcopy(doc["vips"][0]))
    with pytest.raises(StateError, match=r"vips\[1\]: duplicate VIP address"):
        parse_state(doc)
    doc["vips"][1]["address"] = "203.0.113.11"
    with pytest.raises(StateError, match=r"vips\[1\].listeners\[0\].id: duplicate listener id 12"):
        parse_state(doc)
    doc = example_document()
    doc["vips"][0]["listeners"].append(dict(doc["vips"][0]["listeners"][0], id=13))
    with pytest.raises(StateError, match="duplicate listener protocol and port"):
        parse_state(doc)


def test_malformed_key_is_never_echoed() -> None:
    secret = "zz" + "ab" * 20
    with pytest.raises(StateError) as caught:
        parse_state(_set(example_document(), ["cluster", "peer_key"], secret))
    assert secret not in str(caught.value)


def test_bad_json_text_and_missing_file(tmp_path) -> None:
    with pytest.raises(StateError, match="not valid JSON"):
        parse_state("{")
    with pytest.raises(StateError, match="cannot read desired state file"):
        load_state_file(tmp_path / "absent.json")
    path = tmp_path / "state.json"
    path.write_text(json.dumps(example_document()))
    assert load_state_file(path).node == "mux-a"


# ---------------------------------------------------------------------------------------------
# Properties

ipv4 = st.ip_addresses(v=4).map(str)
names = st.from_regex(r"[a-z][a-z0-9-]{0,12}", fullmatch=True)


@st.composite
def backend_docs(draw) -> dict:
    return {
        "address": draw(ipv4),
        "port": draw(st.integers(1, 65535)),
        "weight": draw(st.integers(0, 65535)),
        "state": draw(st.sampled_from(["active", "draining", "disabled"])),
        "mac": draw(st.none() | st.from_regex(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", fullmatch=True)),
        "host": draw(st.none() | names),
    }


def unique_backends(min_size: int = 0):
    return st.lists(
        backend_docs(), min_size=min_size, max_size=6, unique_by=lambda b: (b["address"], b["port"])
    )


@st.composite
def listener_docs(draw, listener_id: int) -> dict:
    generation = draw(st.integers(1, 2**40))
    previous = draw(
        st.none()
        | st.fixed_dictionaries(
            {
                "generation": st.integers(0, generation - 1),
                "backends": unique_backends(),
                "drain_deadline": st.floats(0, 1e10, allow_nan=False),
            }
        )
    )
    interval = draw(st.floats(0.01, 60))
    health = draw(
        st.none()
        | st.fixed_dictionaries(
            {
                "kind": st.sampled_from(["tcp", "http"]),
                "path": st.from_regex(r"/[a-z0-9/._-]{0,20}", fullmatch=True),
                "interval_s": st.just(interval),
                "timeout_s": st.floats(0.001, interval),
                "rise": st.integers(1, 10),
                "fall": st.integers(1, 10),
            }
        )
    )
    return {
        "id": listener_id,
        "protocol": draw(st.sampled_from(["tcp", "udp"])),
        "port": draw(st.integers(1, 65535)),
        "generation": generation,
        "drain_timeout_s": draw(st.integers(0, 3600)),
        "backends": draw(unique_backends()),
        "previous": previous,
        "health_check": health,
    }


@st.composite
def state_docs(draw) -> dict:
    vip_addresses = draw(st.lists(ipv4, max_size=4, unique=True))
    vips = []
    next_id = 1
    for address in vip_addresses:
        listeners = []
        for port_key in draw(
            st.lists(
                st.tuples(st.sampled_from(["tcp", "udp"]), st.integers(1, 65535)), max_size=3, unique=True
            )
        ):
            listener = draw(listener_docs(next_id))
            listener["protocol"], listener["port"] = port_key
            listeners.append(listener)
            next_id += 1
        bypass = draw(st.booleans())
        vips.append(
            {
                "address": address,
                "bypass": bypass,
                "bypass_next_hop": draw(ipv4) if bypass else draw(st.none() | ipv4),
                "fast_path": draw(st.booleans()),
                "listeners": listeners,
            }
        )
    muxes = draw(
        st.lists(
            st.fixed_dictionaries({"name": names, "address": ipv4, "peer_port": st.integers(1, 65535)}),
            max_size=4,
            unique_by=(lambda m: m["name"], lambda m: (m["address"], m["peer_port"])),
        )
    )
    return {
        "version": 1,
        "generation": draw(st.integers(0, 2**62)),
        "node": draw(names),
        "cluster": {
            "hash_seed": draw(st.integers(0, 2**32 - 1)),
            "table_size": draw(st.sampled_from([3, 251, 65537, 131071])),
            "owner_seed": draw(st.integers(0, 2**32 - 1)),
            "muxes": muxes,
            "peer_key": draw(st.binary(min_size=16, max_size=64)).hex(),
            "redirect_key": draw(st.binary(min_size=16, max_size=64)).hex(),
            "max_records": draw(st.integers(0, 10**6)),
        },
        "vips": vips,
    }


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state_docs())
def test_valid_documents_round_trip_exactly(doc) -> None:
    state = parse_state(doc)
    assert isinstance(state, DesiredState)
    assert parse_state(state.to_json()) == state
    assert parse_state(json.loads(state.to_json())).to_json() == state.to_json()


def _leaf_paths(node, prefix=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaf_paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _leaf_paths(value, (*prefix, index))
    yield prefix


json_junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state_docs(), st.data())
def test_mutated_documents_parse_or_raise_state_error_only(doc, data) -> None:
    paths = [p for p in _leaf_paths(doc) if p]
    if not paths:
        return
    path = data.draw(st.sampled_from(paths))
    junk = data.draw(json_junk)
    _set(doc, list(path), junk)
    try:
        state = parse_state(doc)
    except StateError as exc:
        refusal = exc
    else:
        assert parse_state(state.to_json()) == state
        return
    assert refusal.path  # every refusal names where


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_arbitrary_bytes_raise_state_error_only(blob) -> None:
    with pytest.raises(StateError):
        parse_state(blob)


def test_state_parser_reuses_unchanged_vips_and_still_validates_changed_ones() -> None:
    doc = example_document()
    doc["vips"].append({"address": "203.0.113.11", "listeners": []})
    parser = StateParser()
    first = parser.parse(copy.deepcopy(doc))
    doc["vips"][1]["fast_path"] = True
    second = parser.parse(copy.deepcopy(doc))
    assert second.vips[0] is first.vips[0]  # unchanged: not parsed again
    assert second.vips[1].fast_path is True
    assert second == parse_state(doc)
    doc["vips"][1]["fast_path"] = "yes"
    with pytest.raises(StateError, match=r"vips\[1\].fast_path"):
        parser.parse(copy.deepcopy(doc))


def test_listener_table_size_follows_its_backend_cap_or_the_document():
    """A listener's table: the explicit `table_size`, else the smallest prime above 100 x
    `backend_cap`, else the cluster's; never above the cluster's (the owner table's size)."""
    from lbagent.state import table_size_for_cap

    assert table_size_for_cap(64) == 6421
    assert table_size_for_cap(8) == 809
    doc = example_document()
    listener = doc["vips"][0]["listeners"][0]
    state = parse_state(doc)
    assert state.vips[0].listeners[0].table_size_in(state.cluster) == 65537
    listener["backend_cap"] = 64
    state = parse_state(doc)
    assert state.vips[0].listeners[0].table_size_in(state.cluster) == 6421
    assert parse_state(state.to_dict()) == state, "backend_cap round-trips"
    listener["table_size"] = 1009
    assert parse_state(doc).vips[0].listeners[0].table_size_in(state.cluster) == 1009
    listener["backend_cap"] = 4096
    del listener["table_size"]
    assert parse_state(doc).vips[0].listeners[0].table_size_in(state.cluster) == 65537


@pytest.mark.parametrize(("field", "value", "message"), [
    ("table_size", 1000, "expected a prime"),
    ("table_size", 2, "integer 3..131071"),
    ("table_size", 131101, "integer 3..131071"),
    ("table_size", 131071, "larger than cluster.table_size 65537"),
    ("backend_cap", 0, "backend_cap"),
])
def test_bad_listener_table_sizes_are_refused_naming_the_field(field, value, message):
    doc = example_document()
    doc["vips"][0]["listeners"][0][field] = value
    with pytest.raises(StateError, match=message) as excinfo:
        parse_state(doc)
    assert excinfo.value.path == f"vips[0].listeners[0].{field}"


def test_more_backends_than_the_cap_are_refused():
    doc = example_document()
    listener = doc["vips"][0]["listeners"][0]
    listener["backend_cap"] = 1
    listener["backends"] = [listener["backends"][0], {**listener["backends"][0], "port": 9999}]
    with pytest.raises(StateError, match="exceed the listener's backend_cap 1") as excinfo:
        parse_state(doc)
    assert excinfo.value.path == "vips[0].listeners[0].backends"
