"""Benchmark: time from a tenant's REST call until every agent acknowledged the change.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/x REDIS_URL=redis://127.0.0.1:6379/0 \\
        .venv/bin/python bench/propagation.py [--vips 1000] [--agents 4] [--changes 60]

Seeds a scratch PostgreSQL database (created and dropped here; the database named in
DATABASE_URL is only used to reach the server) with VIPS VIPs (one listener, four backends
each), starts the portal under uvicorn with the Redis channel layer and AGENTS agent processes
(`python -m lbagent.portal`, protocol only: no Maglev builds, no health checks), then replaces
one random listener's backends over REST CHANGES times. For each change it waits for the
listener's ACTIVE event on the Channels group the dashboards use, which the portal publishes
once every mux acknowledged the listener's new generation.

Printed next to it, measured in the same run: the REST call alone (the floor the push adds to),
and one Maglev build at M=65537 (what a real data plane adds per changed listener). Ananta
reports a median of 75 ms for VIP configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "datacenter.settings")


def scratch_database_url(base_url: str, name: str) -> str:
    parts = urlsplit(base_url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def create_database(base_url: str, name: str, *, drop: bool = False) -> None:
    import psycopg

    parts = urlsplit(base_url)
    admin = urlunsplit((parts.scheme, parts.netloc, "/postgres", parts.query, parts.fragment))
    with psycopg.connect(admin, autocommit=True) as conn:
        if drop:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        else:
            conn.execute(f'CREATE DATABASE "{name}"')


def seed(vips: int, agents: int) -> tuple[str, list[int], dict[str, str]]:
    """Bulk-insert the world; returns the tenant's API key, listener ids and agent tokens."""
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from datacenter.inventory.models import Host
    from datacenter.loadbalancing.models import Backend, Generation, Listener, Vip, VipPool
    from datacenter.tenancy.models import ApiToken, Membership, Tenant
    from datacenter.testing import new_agent

    call_command("migrate", verbosity=0, interactive=False)
    tenant = Tenant.objects.create(name="Bench", slug="bench", max_vips=vips + 10)
    user = get_user_model().objects.create_user(username="bench", password=secrets.token_hex(16))
    Membership.objects.create(user=user, tenant=tenant, role="admin")
    key = ApiToken.objects.create_token(user, name="bench", write_enabled=True)[1]
    pool = VipPool.objects.create(name="bench", prefix="198.18.0.0/16")
    pool.tenants.add(tenant)
    vip_rows = Vip.objects.bulk_create(
        Vip(
            tenant=tenant,
            pool=pool,
            name=f"vip-{i}",
            address=f"198.18.{i // 250}.{i % 250 + 1}",
            provisioning_status="active",
            operating_status="online",
        )
        for i in range(vips)
    )
    listeners = Listener.objects.bulk_create(
        Listener(vip=vip, protocol="tcp", port=80, generation=1, provisioning_status="active")
        for vip in vip_rows
    )
    backends, generations = [], []
    for index, listener in enumerate(listeners):
        rows = [
            {
                "address": f"10.{64 + index // 250}.{index % 250}.{b + 1}",
                "port": 8080,
                "weight": 1,
                "admin_state": "active",
                "host": None,
            }
            for b in range(4)
        ]
        backends += [
            Backend(listener=listener, position=p, address=r["address"], port=8080)
            for p, r in enumerate(rows)
        ]
        generations.append(Generation(listener=listener, number=1, backends=rows, changes={}))
    Backend.objects.bulk_create(backends)
    Generation.objects.bulk_create(generations)
    host = Host.objects.create(name="lb-bench", management_address="10.0.0.1", roles=["lb-node"])
    tokens = {}
    for n in range(agents):
        tokens[f"mux-{n}"] = new_agent(f"mux-{n}", host, f"10.0.0.{n + 10}")[1]
    from datacenter.loadbalancing import agent_sync

    agent_sync.apply_change(None)
    return key, [li.pk for li in listeners], tokens


class TenantClient:
    """A tenant's API client with one kept-alive HTTP connection, as SDKs and provisioning tools
    keep one (a new TCP connection per call would add its handshake to every figure)."""

    def __init__(self, base_url: str, key: str) -> None:
        parts = urlsplit(base_url)
        self._connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        self._headers = {"Authorization": f"Token {key}", "Content-Type": "application/json"}

    def put_backends(self, listener_id: int, backends: list[dict]) -> float:
        body = json.dumps({"backends": backends}).encode()
        started = time.perf_counter()
        self._connection.request("PUT", f"/api/listeners/{listener_id}/backends/", body, self._headers)
        response = self._connection.getresponse()
        response.read()
        assert response.status == 200, response.status
        return time.perf_counter() - started

    def close(self) -> None:
        self._connection.close()


async def wait_active(layer, channel: str, timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            message = await layer.receive(channel)
            if (
                message.get("kind") == "listener.provisioning_status"
                and message["data"]["status"] == "active"
            ):
                return


async def measure(
    client: TenantClient, listener_ids: list[int], changes: int, pause_s: float = 0.0
) -> tuple[list[float], list[float]]:
    from channels.layers import get_channel_layer

    from datacenter.loadbalancing.agent_sync import listener_group

    layer = get_channel_layer()
    rng = random.Random(7)
    propagation, api_only = [], []
    for change in range(changes):
        listener_id = rng.choice(listener_ids)
        channel = await layer.new_channel()
        await layer.group_add(listener_group(listener_id), channel)
        backends = [{"address": f"10.200.{change % 250}.{b + 1}", "port": 8080} for b in range(4)]
        started = time.perf_counter()
        api_s = await asyncio.to_thread(client.put_backends, listener_id, backends)
        await wait_active(layer, channel, 30)
        if os.environ.get("BENCH_TIMELINE"):
            print(f"change {change}: started {time.time() - (time.perf_counter() - started):.3f} "
                  f"REST {api_s * 1000:.1f} ms, ACTIVE after {(time.perf_counter() - started) * 1000:.1f} ms")
        propagation.append(time.perf_counter() - started)
        api_only.append(api_s)
        await layer.group_discard(listener_group(listener_id), channel)
        if pause_s:
            await asyncio.sleep(pause_s)
    return propagation, api_only


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vips", type=int, default=1000)
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--changes", type=int, default=60)
    parser.add_argument(
        "--pause", type=float, default=0.0, help="seconds between one change's ACTIVE and the next call"
    )
    args = parser.parse_args()
    base_db, redis_url = os.environ.get("DATABASE_URL", ""), os.environ.get("REDIS_URL", "")
    if not base_db.startswith("postgres") or not redis_url:
        print("bench/propagation.py needs DATABASE_URL (PostgreSQL) and REDIS_URL", file=sys.stderr)
        return 2
    db_name = f"bench_push_{os.getpid()}"
    create_database(base_db, db_name)
    os.environ["DATABASE_URL"] = scratch_database_url(base_db, db_name)
    os.environ.setdefault("DJANGO_SECRET_KEY", secrets.token_urlsafe(50))
    import django

    django.setup()
    from tests.push.stack import AgentProcess, PortalServer

    workdir = Path(tempfile.mkdtemp(prefix="bench-push-"))
    portal, agents = None, []
    try:
        seeding = time.perf_counter()
        key, listener_ids, tokens = seed(args.vips, args.agents)
        print(
            f"seeded {args.vips} VIPs x 1 listener x 4 backends, {args.agents} agents "
            f"in {time.perf_counter() - seeding:.1f} s"
        )
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env.update(
            {
                "DATACENTER_EMBEDDED_WORKER": "0",
                "PYTHONPATH": str(REPO_ROOT),
                "DATACENTER_LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
            }
        )
        portal = PortalServer(env=env, workdir=workdir)
        portal.start()
        agents = [
            AgentProcess(
                name,
                token,
                portal,
                workdir,
                write_applied_file=False,
                extra_args=(
                    "--no-tables",
                    "--no-health",
                    "--log-level",
                    os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
                ),
            )
            for name, token in tokens.items()
        ]
        for agent in agents:
            agent.start()
        from datacenter.loadbalancing.models import AgentNode

        deadline = time.monotonic() + 120
        while AgentNode.objects.filter(applied_generation__isnull=False).count() < len(agents):
            if time.monotonic() > deadline:
                raise SystemExit(f"agents did not sync: {agents[0].log()[-2000:]}")
            time.sleep(0.2)
        while not agents[0].cache_file.exists():  # agents persist their state within 0.5 s
            if time.monotonic() > deadline:
                raise SystemExit(f"agent wrote no state cache: {agents[0].log()[-2000:]}")
            time.sleep(0.1)
        document_bytes = agents[0].cache_file.stat().st_size
        warm_up = TenantClient(portal.http_url, key)
        warm_up.put_backends(listener_ids[0], [{"address": "10.201.0.1", "port": 8080}])
        warm_up.close()
        # Steady state: the seeded rows are older than the portal's rebuild slack (changes in the
        # last few seconds are re-read on every build to cover late commits).
        from datacenter.loadbalancing.desired_state import REBUILD_SLACK

        time.sleep(REBUILD_SLACK.total_seconds() + 1)
        client = TenantClient(portal.http_url, key)  # opened now: the server closes idle ones after 5 s
        propagation, api_only = asyncio.run(measure(client, listener_ids, args.changes, args.pause))
        client.close()

        from lbagent.core.maglev import maglev_table

        names = [f"10.0.0.{i}:80" for i in range(4)]
        build_s = []
        for _ in range(3):
            started = time.perf_counter()
            maglev_table(names, table_size=65537)
            build_s.append(time.perf_counter() - started)

        ms = 1000.0
        p50, p95 = statistics.median(propagation) * ms, percentile(propagation, 0.95) * ms
        api50, api95 = statistics.median(api_only) * ms, percentile(api_only, 0.95) * ms
        load = os.getloadavg()
        print(
            f"machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
            "(other work on the machine inflates every figure below, the baseline too)"
        )
        print(f"desired-state document: {document_bytes / 1024:.0f} KiB per agent ({args.vips} VIPs)")
        print(
            f"API call -> all {args.agents} agents acknowledged (ACTIVE), {args.changes} changes: "
            f"p50 {p50:.1f} ms, p95 {p95:.1f} ms"
        )
        print(
            f"baseline, the REST call alone (same run):              p50 {api50:.1f} ms, p95 {api95:.1f} ms"
        )
        print(f"push overhead over the REST call: p50 {p50 - api50:.1f} ms (ratio {p50 / api50:.2f}x)")
        print(f"Ananta (paper): median 75 ms for VIP configuration -> ratio {p50 / 75:.2f}x")
        print(
            f"not included above (agents ran protocol-only): one Maglev build at M=65537, 4 backends: "
            f"{min(build_s) * ms:.0f} ms per changed listener in the real data plane"
        )
    finally:
        for agent in agents:
            agent.stop()
        if portal is not None:
            portal.stop()
        from django.db import connections

        connections.close_all()
        create_database(base_db, db_name, drop=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
