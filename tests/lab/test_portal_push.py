"""Issue 5, acceptance 1 in the lab: a tenant replaces a listener's backends over the portal's REST
API; both lab muxes, running the kernel daemon in portal mode (`lbagent run --portal ...`), apply
and acknowledge; the listener becomes ACTIVE; and real TCP traffic from the lab's client follows:
new connections go only to the new backends, connections opened before the change keep theirs.

The portal runs under uvicorn in the root namespace (PostgreSQL and Redis are on loopback there)
on a veth into the lab (tests/lab/portal_stack.py). The session's file-mode mux daemons are stopped
for this test and restarted afterwards with the cluster's state, so the lab is left as found.
"""

from __future__ import annotations

import collections
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import pytest

from lbagent.lab.harness import LongConnections, ask, wait_route
from tests.environment import need
from tests.lab.portal_stack import PortalLink, PortalMux
from tests.push.stack import PortalServer
from tests.services import database_url_for_test_db, redis_answers

# django_db: pytest-django sets the test database up only for sessions that ask for it. The rows
# are committed by the module fixture (before the test's own transaction) so the portal sees them.
pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.django_db]

VIP = "203.0.113.17"  # not used by the other lab tests
DRAIN_S = 120  # longer than the test: connections on the removed backend drain, not break
# REST call -> both kernels applied and acknowledged -> ACTIVE: a generous bound on the event, not a
# speed goal (bench/propagation.py --kernel measures the speed; this test printed 0.9-2.3 s idle).
PROPAGATION_BOUND_S = 120.0
SHORT_CONNECTIONS = 200
LONG_CONNECTIONS = 24

# The portal's API answers urllib directly, never through a proxy from the environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


@dataclass
class PortalLab:
    lab: Any
    portal: PortalServer
    muxes: list[PortalMux]
    key: str
    vip_id: int
    listener_id: int

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        request = urllib.request.Request(  # noqa: S310 (http URL of the portal this test started)
            self.portal.http_url + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Authorization": f"Token {self.key}", "Content-Type": "application/json"},
        )
        try:
            with _opener.open(request, timeout=10) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def listener_status(self) -> dict:
        code, tree = self.api("GET", f"/api/vips/{self.vip_id}/status/")
        assert code == 200, tree
        return next(li for li in tree["listeners"] if li["id"] == self.listener_id)

    def settled(self, newer_than: int = 0) -> dict | None:
        """The listener's status node once a table generation above `newer_than` is ACTIVE,
        acknowledged by every mux."""
        node = self.listener_status()
        if (node["generation"] or 0) > newer_than and node["provisioning_status"] == "active" and all(
            a["status"] == "active" and (a["applied_generation"] or 0) >= node["generation"]
            for a in node["agents"]
        ):
            return node
        return None


def _backend(node) -> dict:
    return {"address": node.address, "port": 80}


def _make_world(lab) -> tuple[str, int, int, dict[str, str]]:
    """A tenant with a member's API token, the VIP with one listener on web-1 and web-2, and the
    two lab muxes registered as agents (their tokens, shown once)."""
    from datacenter.inventory.models import Host
    from datacenter.loadbalancing import services
    from datacenter.loadbalancing.models import VipPool
    from datacenter.tenancy.choices import MembershipRole
    from datacenter.tenancy.models import Membership, Tenant
    from datacenter.testing import make_token, make_user, new_agent

    tenant = Tenant.objects.create(name="Lab", slug="lab")
    member = make_user("lab-member")
    Membership.objects.create(user=member, tenant=tenant, role=MembershipRole.MEMBER)
    key = make_token(member)
    pool = VipPool.objects.create(name="lab-public", prefix="203.0.113.0/24")
    pool.tenants.add(tenant)
    vip = services.create_vip(tenant=tenant, name="lab-web", address=VIP, user=member)
    listener = services.create_listener(vip=vip, protocol="tcp", port=80, drain_timeout_s=DRAIN_S,
                                        user=member)
    services.replace_backends(listener, [_backend(b) for b in lab.backends[:2]], user=member)
    host = Host.objects.create(name="lab-lb", management_address=lab.router.address, roles=["lb-node"])
    tokens = {}
    for mux in lab.muxes:
        tokens[mux.name] = new_agent(mux.name, host, mux.address)[1]
    return key, vip.pk, listener.pk, tokens


@pytest.fixture(scope="module")
def portal_lab(lab, cluster, django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[PortalLab]:
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection

    need(redis_answers(getattr(settings, "REDIS_URL", None)),
         "needs Redis (REDIS_URL set and answering; `make services` starts it)")
    need(connection.vendor == "postgresql", "needs PostgreSQL (DATABASE_URL) shared with the portal process")
    with django_db_blocker.unblock(), ExitStack() as cleanup:  # cleanup runs with the DB unblocked
        # Registered in reverse order of need: the last one registered runs first.
        cleanup.callback(call_command, "flush", interactive=False, verbosity=0)  # no rows for later tests
        link = PortalLink(lab)
        cleanup.callback(link.down)
        link.up()
        key, vip_id, listener_id, tokens = _make_world(lab)

        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env.update({
            "DATABASE_URL": database_url_for_test_db(),
            "REDIS_URL": settings.REDIS_URL,
            "DJANGO_SECRET_KEY": settings.SECRET_KEY,
            "DJANGO_ALLOWED_HOSTS": f"127.0.0.1,localhost,{link.portal_address}",
            "DATACENTER_EMBEDDED_WORKER": "0",
            "PYTHONPATH": str(settings.BASE_DIR),
        })
        portal = PortalServer(env=env, workdir=tmp_path_factory.mktemp("lab-portal"),
                              host=link.portal_address)
        cleanup.callback(portal.stop)
        portal.start()

        # One daemon per mux namespace: the file-mode ones make way, and come back afterwards with
        # the cluster's state (what the other lab tests expect to find).
        def restore_file_mode() -> None:
            for mux in cluster.muxes:
                if not mux.alive():
                    cluster.restart(mux)

        cleanup.callback(restore_file_mode)
        for mux in cluster.muxes:
            if mux.alive():
                mux.stop()
        muxes = [PortalMux(lab, m, portal_url=portal.ws_url, token=tokens[m.name]) for m in lab.muxes]
        for mux in muxes:
            cleanup.callback(mux.stop)
            mux.start()
        stack = PortalLab(lab=lab, portal=portal, muxes=muxes, key=key, vip_id=vip_id,
                          listener_id=listener_id)
        try:
            wait_for(stack.settled, 30, "the listener to become ACTIVE on both portal-mode muxes")
            for mux in muxes:
                mux.wait_bgp_up()
            wait_route(lab, VIP, [m.address for m in lab.muxes])
        except BaseException:
            print("portal log:", portal.log()[-3000:])
            for mux in muxes:
                print(f"{mux.mux.name} log:", mux.log_tail(3000))
            raise
        yield stack


def test_a_tenant_replaces_backends_over_rest_and_lab_traffic_follows(portal_lab):
    lab = portal_lab.lab
    client = lab.clients[0].netns
    web1, web2, web3 = lab.backends[:3]

    before = collections.Counter(ask(client, VIP) for _ in range(SHORT_CONNECTIONS))
    assert set(before) == {web1.name, web2.name}, f"before the change: {before}"
    generation_before = portal_lab.listener_status()["generation"]

    conns = LongConnections(client, VIP, LONG_CONNECTIONS)
    try:
        assert not conns.broken, f"long connections broken before the change: {conns.broken}"
        on_b = [i for i, name in enumerate(conns.backend) if name == web2.name]
        assert on_b, f"no long-lived connection landed on {web2.name}: {conns.backend}"
        conns.start_background()

        started = time.monotonic()
        code, body = portal_lab.api("PUT", f"/api/listeners/{portal_lab.listener_id}/backends/",
                                    {"backends": [_backend(web2), _backend(web3)]})
        assert code == 200, body
        node = wait_for(lambda: portal_lab.settled(newer_than=generation_before), PROPAGATION_BOUND_S,
                        "both muxes to apply and acknowledge the new backends (listener ACTIVE)")
        propagation_s = time.monotonic() - started
        apply_s = {m.mux.name: round(m.metric("lbagent_last_apply_seconds"), 3) for m in portal_lab.muxes}
        assert {a["agent"]: a["status"] for a in node["agents"]} == {m.name: "active" for m in lab.muxes}
        assert [(b["address"], b["in_table"]) for b in node["backends"]] == [
            (web2.address, True), (web3.address, True)]
        assert node["draining_until"] is not None  # the old table stays for the drain
        for mux in portal_lab.muxes:  # what the kernel daemons report applying
            # The portal may push a newer document meanwhile (a health report): wait until the
            # config file and the applied generation agree, then check its content.
            wait_for(lambda mux=mux: mux.metric("lbagent_config_generation")
                     == json.loads(mux.config.read_text())["generation"], PROPAGATION_BOUND_S,
                     f"{mux.mux.name} to apply the configuration it wrote")
            applied = json.loads(mux.config.read_text())
            listener = next(li for v in applied["vips"] for li in v["listeners"]
                            if li["id"] == portal_lab.listener_id)
            assert [b["address"] for b in listener["backends"]] == [web2.address, web3.address]

        # The acknowledgement means "in the kernel": new connections go to B and C only, at once.
        after = collections.Counter(ask(client, VIP) for _ in range(SHORT_CONNECTIONS))
        assert set(after) == {web2.name, web3.name}, f"after the change: {after}"
        conns.settle(3)
    finally:
        conns.close()
    print(f"\nREST call -> ACTIVE on both muxes in {propagation_s:.3f} s (kernel apply {apply_s} s); "
          f"before {dict(before)}, "
          f"after {dict(after)}; long-lived connections per backend "
          f"{dict(collections.Counter(conns.backend))}")
    assert conns.broken_on({web2.name}) == {}, "connections to the kept backend broke"
    # Connections on the replaced backend drain on their old backend (old table + pins) and the
    # ones on the kept backend never moved: none of the connections opened before the change broke.
    assert conns.broken == {}, f"{len(conns.broken)} long-lived connections broke: {conns.broken}"


def test_kernel_muxes_report_their_traffic_and_bgp_to_the_portal(portal_lab, django_db_blocker):
    """What the Agents page shows for real muxes: the kernel daemon's bridge sends its metrics
    (packets the kernel counted, BGP session and routes) in its stats frames, every 5 s."""
    from datacenter.loadbalancing.models import AgentNode

    client = portal_lab.lab.clients[0].netns
    for _ in range(20):  # traffic through the kernel, whichever mux ECMP picks
        ask(client, VIP)
    names = {m.name for m in portal_lab.lab.muxes}

    def reported() -> dict[str, dict] | None:
        with django_db_blocker.unblock():
            stats = dict(AgentNode.objects.filter(name__in=names).values_list("name", "last_stats"))
        if set(stats) != names or sum(s.get("packets", 0) for s in stats.values()) == 0:
            return None
        if any(s.get("bgp.session_up") != 1 for s in stats.values()):
            return None
        return stats

    stats = wait_for(reported, 60, "both muxes to report packets and an established BGP session")
    for name, counters in stats.items():
        assert counters["bgp.routes"] >= 1, (name, counters)  # the VIP is announced
        assert {"new_flows", "slowpath_decisions", "flow_records", "daemon.applies"} <= set(counters), name
        assert counters["daemon.applies"] >= 1, (name, counters)
