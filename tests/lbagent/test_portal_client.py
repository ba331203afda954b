"""The agent's portal client against a small real websocket server on loopback: hello, apply,
acknowledge, refuse bad state with a reason, close on malformed frames, reconnect with backoff,
and keep the applied state while the portal is gone (fail static)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import threading
from collections.abc import Mapping

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Response

from lbagent.portal import Backoff, PartialApply, PortalClient, TableDriver
from lbagent.state import DesiredState, parse_state
from tests.lbagent.test_state import example_document

TOKEN = "dca_test-token-value"
WAIT_S = 5.0


def desired_frame(document_generation: int, **listener_changes) -> str:
    doc = example_document()
    doc["generation"] = document_generation
    doc["vips"][0]["listeners"][0].update(listener_changes)
    doc["vips"][0]["listeners"][0]["health_check"] = None
    return json.dumps({"type": "desired", "protocol": 1, "state": doc})


class FakePortal:
    """A websocket server speaking the portal's side of protocol 1, scripted by the test."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[ServerConnection, dict]] = asyncio.Queue()
        self.connections: list[ServerConnection] = []
        self.closes: list[tuple[int | None, str | None]] = []
        self.refuse = False
        self.server = None
        self.port = 0

    async def start(self, port: int = 0) -> None:
        self.server = await serve(self._handler, "127.0.0.1", port, process_request=self._check_token)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/agents/"

    def _check_token(self, connection, request):
        if self.refuse or request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return Response(403, "Forbidden", Headers(), b"bad token\n")
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        self.connections.append(ws)
        with contextlib.suppress(ConnectionClosed):  # the tests inspect the close code instead
            async for frame in ws:
                await self.received.put((ws, json.loads(frame)))
        self.closes.append((ws.close_code, ws.close_reason))

    async def next_message(self, kind: str) -> tuple[ServerConnection, dict]:
        async with asyncio.timeout(WAIT_S):
            while True:
                ws, message = await self.received.get()
                if message["type"] == kind:
                    return ws, message


class RecordingDriver:
    def __init__(self) -> None:
        self.applied: list[DesiredState] = []
        self.fail_with: Exception | None = None

    def apply(self, state: DesiredState) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.applied.append(state)

    def counters(self) -> Mapping[str, int]:
        return {"applies": len(self.applied)}


@pytest.fixture
async def portal():
    fake = FakePortal()
    await fake.start()
    yield fake
    with contextlib.suppress(Exception):
        await fake.stop()


@contextlib.asynccontextmanager
async def running(client: PortalClient):
    task = asyncio.create_task(client.run())
    try:
        yield client
    finally:
        client.stop()
        async with asyncio.timeout(WAIT_S):
            await task


def make_client(portal: FakePortal, driver, **kwargs) -> PortalClient:
    return PortalClient(
        portal.url,
        kwargs.pop("token", TOKEN),
        driver,
        node="mux-a",
        backoff=Backoff(initial_s=0.05, maximum_s=0.2, rng=random.Random(1)),
        health_checks=False,
        **kwargs,
    )


async def test_hello_apply_and_acknowledge(portal) -> None:
    driver = RecordingDriver()
    async with running(make_client(portal, driver)):
        ws, hello = await portal.next_message("hello")
        assert hello == {
            "type": "hello",
            "protocol": 1,
            "node": "mux-a",
            "role": "mux",
            "version": hello["version"],
            "applied_generation": None,
            "listeners": {},  # runs nothing yet: the portal clears any rows a previous run left
        }
        await ws.send(desired_frame(17))
        _, ack = await portal.next_message("applied")
        assert ack == {
            "type": "applied",
            "protocol": 1,
            "generation": 17,
            "ok": True,
            "error": None,
            "listeners": {"12": 5},
        }
        await ws.send(desired_frame(18, generation=6, previous=None))
        _, ack = await portal.next_message("applied")
        assert (ack["generation"], ack["listeners"]) == (18, {"12": 6})
    assert [s.generation for s in driver.applied] == [17, 18]


REASON = "VIP 203.0.113.10: no MAC for backend 10.1.0.9 on eth0 within 1.0 s"


class RefusingOneVipDriver(RecordingDriver):
    """Applies everything except VIP 203.0.113.10, which keeps running listener 12 at generation 5
    (what the kernel daemon reports when a backend's MAC does not resolve)."""

    def apply(self, state: DesiredState) -> PartialApply | None:
        super().apply(state)
        return PartialApply({**state.listener_generations(), 12: 5}, {12: REASON})


async def test_a_partial_apply_is_acknowledged_with_what_runs_and_why(portal) -> None:
    driver = RefusingOneVipDriver()
    client = make_client(portal, driver)
    async with running(client):
        ws, _ = await portal.next_message("hello")
        await ws.send(desired_frame(30, generation=6, previous=None))
        _, ack = await portal.next_message("applied")
        assert (ack["ok"], ack["error"], ack["listeners"]) == (True, None, {"12": 5})
        assert ack["listener_errors"] == {"12": REASON}
        # The same content under a new document number needs no data-plane work, and the
        # acknowledgement still says what runs.
        await ws.send(desired_frame(31, generation=6, previous=None))
        _, again = await portal.next_message("applied")
        assert (again["generation"], again["listeners"], again["listener_errors"]) == (
            31,
            {"12": 5},
            {"12": REASON},
        )
        # The data plane heals on its own (a retry resolved the MAC): the same document is
        # acknowledged again, whole.
        await client.reacknowledge(31, None)
        _, healed = await portal.next_message("applied")
        assert (healed["generation"], healed["listeners"], "listener_errors" in healed) == (
            31,
            {"12": 6},
            False,
        )
    assert [s.generation for s in driver.applied] == [30]


async def test_invalid_state_is_refused_with_reason_and_connection_stays(portal) -> None:
    driver = RecordingDriver()
    async with running(make_client(portal, driver)):
        ws, _ = await portal.next_message("hello")
        await ws.send(desired_frame(20, port=0))
        _, ack = await portal.next_message("applied")
        assert ack["ok"] is False
        assert ack["generation"] == 20
        assert "vips[0].listeners[0].port" in ack["error"]
        await ws.send(desired_frame(21))
        _, ack = await portal.next_message("applied")
        assert ack["ok"] is True
    assert [s.generation for s in driver.applied] == [21]
    assert len(portal.connections) == 1


async def test_driver_failure_is_reported_and_previous_state_kept(portal) -> None:
    driver = RecordingDriver()
    client = make_client(portal, driver)
    async with running(client):
        ws, _ = await portal.next_message("hello")
        await ws.send(desired_frame(1))
        await portal.next_message("applied")
        driver.fail_with = OSError("nft: Could not process rule: No space left on device")
        await ws.send(desired_frame(2, generation=6, previous=None))
        _, ack = await portal.next_message("applied")
        assert ack["ok"] is False
        assert "No space left on device" in ack["error"]
        assert client.applied.generation == 1


async def test_malformed_frame_closes_with_reason_then_reconnects_and_resyncs(portal, caplog) -> None:
    driver = RecordingDriver()
    caplog.set_level(logging.ERROR, logger="lbagent.portal")
    async with running(make_client(portal, driver)):
        ws, _ = await portal.next_message("hello")
        await ws.send(desired_frame(5))
        _, first_ack = await portal.next_message("applied")
        await ws.send('{"type": "desired", "protocol": 1')  # truncated JSON
        ws2, hello = await portal.next_message("hello")
        assert ws2 is not ws
        assert hello["applied_generation"] == 5  # it kept running generation 5 meanwhile
        # ... and says what it runs in its acknowledgement's terms: the portal rebuilds from it.
        assert hello["listeners"] == first_ack["listeners"] != {}
        await ws2.send(desired_frame(5))
        _, ack = await portal.next_message("applied")
        assert ack["ok"] is True
    assert portal.closes[0][0] == 1008
    assert "not valid JSON" in portal.closes[0][1]
    assert "malformed message from the portal" in caplog.text
    assert len(driver.applied) == 1  # the identical resync was acknowledged without re-applying


async def test_fail_static_while_portal_is_down_then_resync(portal, caplog) -> None:
    caplog.set_level(logging.INFO, logger="lbagent.portal")
    driver = TableDriver(build_tables=False)
    client = make_client(portal, driver)
    async with running(client):
        ws, _ = await portal.next_message("hello")
        await ws.send(desired_frame(9))
        await portal.next_message("applied")
        port = portal.port
        before = caplog.text.count("reconnecting to the portal")
        await portal.stop()
        async with asyncio.timeout(WAIT_S):  # several failed reconnects
            while caplog.text.count("reconnecting to the portal") < before + 3:
                await asyncio.sleep(0.05)
        assert client.applied.generation == 9  # still forwarding with the last state
        assert set(driver.tables) == {12}
        restarted = FakePortal()
        await restarted.start(port)
        try:
            ws, hello = await restarted.next_message("hello")
            assert hello["applied_generation"] == 9
            await ws.send(desired_frame(10, generation=6, previous=None))
            _, ack = await restarted.next_message("applied")
            assert ack["generation"] == 10
        finally:
            await restarted.stop()


async def test_refused_token_keeps_retrying_without_applying(portal) -> None:
    driver = RecordingDriver()
    client = make_client(portal, driver, token="dca_wrong")
    async with running(client):
        async with asyncio.timeout(WAIT_S):
            while client.counters["refused"] < 2:
                await asyncio.sleep(0.05)
    assert driver.applied == []
    assert portal.received.empty()


async def test_state_cache_survives_an_agent_restart(portal, tmp_path) -> None:
    cache = tmp_path / "state.json"
    first = RecordingDriver()
    async with running(make_client(portal, first, state_cache=cache)):
        ws, _ = await portal.next_message("hello")
        await ws.send(desired_frame(33))
        await portal.next_message("applied")
    second = RecordingDriver()
    restarted = make_client(portal, second, state_cache=cache)
    restarted.load_cached_state()  # before any portal contact
    assert [s.generation for s in second.applied] == [33]
    async with running(restarted):
        _, hello = await portal.next_message("hello")
        assert hello["applied_generation"] == 33


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    backoff = Backoff(initial_s=0.1, maximum_s=2.0, rng=random.Random(7))
    delays = [backoff.next_delay_s() for _ in range(12)]
    assert all(0.05 <= d <= 2.0 for d in delays)
    assert delays[0] <= 0.1
    assert max(delays[-4:]) > 1.0
    other = Backoff(initial_s=0.1, maximum_s=2.0, rng=random.Random(8))
    assert delays != [other.next_delay_s() for _ in range(12)]  # agents do not reconnect in lockstep
    backoff.reset()
    assert backoff.next_delay_s() <= 0.1


def test_table_driver_builds_maglev_tables_and_reuses_unchanged_ones(tmp_path) -> None:
    doc = example_document()
    doc["cluster"]["table_size"] = 251
    driver = TableDriver(applied_file=tmp_path / "applied.json")
    driver.apply(parse_state(doc))
    table = driver.tables[12]
    assert len(table) == 251
    assert set(table.tolist()) == {0}  # one active backend; the draining one takes no new flows
    doc["generation"] += 1
    driver.apply(parse_state(doc))
    assert driver.counters()["tables_built"] == 1
    assert json.loads((tmp_path / "applied.json").read_text())["generation"] == doc["generation"]


class FileDrivenDaemon:
    """Stand-in for lbagent.daemon.MuxDaemon's contract with the bridge (its real data plane needs
    root and namespaces; the lab tests cover it): applies what `submit` hands it, and what it
    finds in its config file."""

    def __init__(self, config, refuse_port: int | None = None) -> None:
        import types

        self.o = types.SimpleNamespace(config=config)
        self.applied_generation = 0
        self.apply_errors = self.config_errors = self.apply_count = 0
        self.refuse_port = refuse_port
        self.listener_errors: dict[int, str] = {}  # this stand-in applies all or nothing
        self.running_generations: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        from lbagent.state import StateError, load_state_file

        seen = None
        while not self._stop.wait(0.02):
            try:
                mtime = self.o.config.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            if mtime == seen:
                continue
            seen = mtime
            try:
                state = load_state_file(self.o.config)
            except StateError:
                self.config_errors += 1
                continue
            if state.generation > self.applied_generation:  # not the bridge's copy of a submitted one
                self.submit(state)

    def submit(self, state) -> None:
        if any(li.port == self.refuse_port for _, li in state.listeners()):
            self.apply_errors += 1
            return
        self.applied_generation = state.generation
        self.apply_count += 1

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def collect(self, *, summary: bool = False) -> str:
        """The daemon's Prometheus text, in the shape MuxDaemon.collect(summary=True) renders it."""
        from lbagent.metrics import Metric, render

        return render(
            [
                Metric("lbagent_listener_packets_total", "", "counter")
                .add(1200, listener="12")
                .add(34, listener="13"),
                Metric("lbagent_kernel_new_flows_total", "", "counter").add(40, listener="12"),
                Metric("lbagent_slowpath_decisions_total", "", "counter")
                .add(5, reason="owner")
                .add(2, reason="syn"),
                Metric("lbagent_flow_records", "").add(17),
                Metric("lbagent_applies_total", "", "counter").add(self.apply_count),
                Metric("lbagent_last_apply_seconds", "").add(0.25),
                Metric("lbagent_bgp_session_up", "").add(1, neighbor="10.0.0.1"),
                Metric("lbagent_bgp_routes", "")
                .add(1, prefix="203.0.113.10/32", next_hop="10.0.0.2")
                .add(1, prefix="203.0.113.20/32", next_hop="10.0.0.2"),
                Metric("lbagent_bgp_speaker_restarts_total", "", "counter").add(0),
            ]
        )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


async def test_daemon_bridge_acknowledges_only_what_the_daemon_applied(portal, tmp_path) -> None:
    from lbagent.portal import portal_mode

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    config = tmp_path / "state.json"
    rest, bridge = portal_mode(
        [
            "--portal",
            portal.url,
            "--token-file",
            str(token_file),
            "--node",
            "mux-a",
            "--config",
            str(config),
            "--iface",
            "eth0",
        ]
    )
    assert rest == ["--config", str(config), "--iface", "eth0"]
    daemon = FileDrivenDaemon(config, refuse_port=8443)
    bridge.attach(daemon)
    try:
        ws, hello = await portal.next_message("hello")
        assert hello["node"] == "mux-a"
        await ws.send(desired_frame(40))
        _, ack = await portal.next_message("applied")
        assert (ack["ok"], ack["generation"], daemon.applied_generation) == (True, 40, 40)
        await ws.send(desired_frame(41, port=8443, generation=6, previous=None))
        _, ack = await portal.next_message("applied")
        assert ack["ok"] is False
        assert "refused generation 41" in ack["error"]
        assert daemon.applied_generation == 40
        # Generation 40's content again under a new number: acknowledged without the daemon.
        await ws.send(desired_frame(42))
        _, ack = await portal.next_message("applied")
        assert (ack["ok"], ack["generation"], daemon.applied_generation) == (True, 42, 40)
        # The daemon's own retry changes what runs (a refused VIP, then healed) without a new
        # document: the bridge acknowledges the running document (42) again each time.
        daemon.running_generations, daemon.listener_errors = {12: 0}, {12: "VIP 203.0.113.10: no MAC"}
        _, ack = await portal.next_message("applied")
        assert (ack["generation"], ack["listeners"], ack["listener_errors"]) == (
            42,
            {"12": 0},
            {"12": "VIP 203.0.113.10: no MAC"},
        )
        daemon.listener_errors = {}
        _, ack = await portal.next_message("applied")
        assert (ack["generation"], ack["listeners"], "listener_errors" in ack) == (42, {"12": 5}, False)
    finally:
        await asyncio.to_thread(bridge.stop)
        daemon.stop()


def test_portal_mode_leaves_plain_daemon_arguments_alone(tmp_path) -> None:
    from lbagent.portal import portal_mode

    assert portal_mode(["--config", "x.json"]) == (["--config", "x.json"], None)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    rest, bridge = portal_mode(["--portal", "ws://127.0.0.1:1/ws/agents/", "--token-file", str(token_file)])
    assert rest == ["--config", "/var/lib/lbagent/portal-state.json"]
    assert bridge is not None


async def test_daemon_bridge_reports_the_daemons_metrics_under_the_dashboards_names(portal, tmp_path) -> None:
    """A kernel mux's stats frame carries what its /metrics shows (packets, new flows, slow-path
    decisions, records, BGP), not only its apply counters: the Agents page reads these names."""
    from lbagent.portal import portal_mode
    from lbagent.protocol import decode_agent_message

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    config = tmp_path / "state.json"
    args = ["--portal", portal.url, "--token-file", str(token_file), "--config", str(config)]
    rest, bridge = portal_mode([*args, "--portal-stats-interval", "0.05"])
    assert rest == ["--config", str(config)]
    daemon = FileDrivenDaemon(config)
    bridge.attach(daemon)
    try:
        ws, _ = await portal.next_message("hello")
        await ws.send(desired_frame(40))
        await portal.next_message("applied")
        while True:  # a frame sent before the apply may still be queued
            _, stats = await portal.next_message("stats")
            if stats["counters"]["daemon.applies"] == 1:
                break
        counters = stats["counters"]
        assert {k: counters[k] for k in ("packets", "new_flows", "slowpath_decisions", "flow_records")} == {
            "packets": 1234,  # summed over listeners
            "new_flows": 40,
            "slowpath_decisions": 7,  # summed over reasons
            "flow_records": 17,
        }
        bgp = {k: v for k, v in counters.items() if k.startswith("bgp")}
        assert bgp == {"bgp.session_up": 1, "bgp.routes": 2, "bgp.speaker_restarts": 0}
        assert (counters["daemon.applies"], counters["daemon.apply_errors"]) == (1, 0)
        assert "daemon.last_apply_seconds" not in counters  # a duration, not a count
        # The portal's own parser accepts the frame as sent.
        assert decode_agent_message(json.dumps(stats)).counters == counters
    finally:
        await asyncio.to_thread(bridge.stop)
        daemon.stop()


def test_the_bridge_reads_metric_names_the_real_daemon_renders(tmp_path) -> None:
    """The mapping names metrics MuxDaemon.collect() really has (a renamed metric would silently
    report 0): every headline and BGP metric appears in an unstarted daemon's /metrics text."""
    from lbagent.daemon import DaemonOptions, MuxDaemon
    from lbagent.portal import BGP_FROM_METRICS, HEADLINE_FROM_METRICS, counters_from_metrics

    text = MuxDaemon(DaemonOptions(config=tmp_path / "state.json")).collect()
    rendered = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    wanted = set(HEADLINE_FROM_METRICS.values()) | set(BGP_FROM_METRICS.values()) | {"lbagent_bgp_routes"}
    assert wanted <= rendered, wanted - rendered
    counters = counters_from_metrics(text)
    assert counters["daemon.applies"] == 0
    assert not any(k.startswith("bgp") for k in counters)  # no BGP configured: the page says so
