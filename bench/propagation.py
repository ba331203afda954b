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


def protocol_only_backends(index: int, count: int = 4) -> list[dict]:
    """Backends of listener `index` for protocol-only agents (addresses no data plane resolves)."""
    return [
        {"address": f"10.{64 + index // 250}.{index % 250}.{b + 1}", "port": 8080, "weight": 1,
         "admin_state": "active", "host": None}
        for b in range(count)
    ]


def seed(vips: int, agents: int | dict[str, str], *, ports: tuple[int, ...] = (80,),
         backends_of=protocol_only_backends,
         table_size: int | None = None) -> tuple[str, list[int], dict[str, str]]:
    """Bulk-insert the world; returns the tenant's API key, listener ids and agent tokens.
    `agents`: how many protocol-only agents, or {name: data address} of real muxes. One listener
    per port of `ports` on each VIP, backends from `backends_of(listener index)`; `table_size`
    sets the cluster's Maglev table size (every listener's kernel maps have that many buckets)."""
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
        Listener(vip=vip, protocol="tcp", port=port, generation=1, provisioning_status="active")
        for vip in vip_rows
        for port in ports
    )
    backends, generations = [], []
    for index, listener in enumerate(listeners):
        rows = backends_of(index)
        backends += [
            Backend(listener=listener, position=p, address=r["address"], port=r["port"])
            for p, r in enumerate(rows)
        ]
        generations.append(Generation(listener=listener, number=1, backends=rows, changes={}))
    Backend.objects.bulk_create(backends)
    Generation.objects.bulk_create(generations)
    host = Host.objects.create(name="lb-bench", management_address="10.0.0.1", roles=["lb-node"])
    if isinstance(agents, int):
        agents = {f"mux-{n}": f"10.0.0.{n + 10}" for n in range(agents)}
    tokens = {name: new_agent(name, host, address)[1] for name, address in agents.items()}
    if table_size is not None:
        from datacenter.loadbalancing.models_sync import PushSettings

        PushSettings.objects.update_or_create(pk=1, defaults={"table_size": table_size})
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
        try:
            self._connection.request("PUT", f"/api/listeners/{listener_id}/backends/", body, self._headers)
            response = self._connection.getresponse()
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            # The server closes a connection idle for 5 s (a slow ACTIVE before this call): the
            # PUT is idempotent, send it again on a new connection (its handshake is in the figure).
            self._connection.close()
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


def protocol_only_change(change: int) -> list[dict]:
    return [{"address": f"10.200.{change % 250}.{b + 1}", "port": 8080} for b in range(4)]


async def measure(
    client: TenantClient, listener_ids: list[int], changes: int, pause_s: float = 0.0,
    backends_for=protocol_only_change, timeout_s: float = 30.0,
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
        backends = backends_for(change)
        started = time.perf_counter()
        api_s = await asyncio.to_thread(client.put_backends, listener_id, backends)
        await wait_active(layer, channel, timeout_s)
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


def summarize(label: str, propagation: list[float], api_only: list[float]) -> dict[str, float]:
    ms = 1000.0
    out = {"p50": statistics.median(propagation) * ms, "p95": percentile(propagation, 0.95) * ms,
           "api50": statistics.median(api_only) * ms, "api95": percentile(api_only, 0.95) * ms}
    print(f"{label}: p50 {out['p50']:.1f} ms, p95 {out['p95']:.1f} ms; the REST call alone p50 "
          f"{out['api50']:.1f} ms, p95 {out['api95']:.1f} ms")
    return out


def print_machine() -> None:
    load = os.getloadavg()
    print(
        f"machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
        "(other work on the machine inflates every figure below, the baseline too)"
    )


def wait_synced(agents_log, timeout_s: float) -> None:
    """Every registered agent has applied the portal's latest document generation."""
    from datacenter.loadbalancing.models import AgentNode
    from datacenter.loadbalancing.models_sync import PushSettings

    deadline = time.monotonic() + timeout_s
    while True:
        wanted = PushSettings.objects.get(pk=1).generation
        behind = AgentNode.objects.exclude(applied_generation__gte=wanted).count()
        if not behind:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"{behind} agents did not apply generation {wanted} in {timeout_s} s: "
                             f"{agents_log()}")
        time.sleep(0.2)


def portal_env(extra_hosts: str = "") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(
        {
            "DATACENTER_EMBEDDED_WORKER": "0",
            "PYTHONPATH": str(REPO_ROOT),
            "DATACENTER_LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
        }
    )
    if extra_hosts:
        env["DJANGO_ALLOWED_HOSTS"] = f"127.0.0.1,localhost,{extra_hosts}"
    return env


def protocol_agents(tokens: dict[str, str], portal, workdir: Path) -> list:
    from tests.push.stack import AgentProcess

    return [
        AgentProcess(
            name,
            token,
            portal,
            workdir,
            write_applied_file=False,
            extra_args=("--no-tables", "--no-health", "--log-level",
                        os.environ.get("BENCH_LOG_LEVEL", "WARNING")),
        )
        for name, token in tokens.items()
    ]


def steady_state_pause() -> None:
    """Let the seeded rows age past the portal's rebuild slack (changes in the last few seconds
    are re-read on every build to cover late commits)."""
    from datacenter.loadbalancing.desired_state import REBUILD_SLACK

    time.sleep(REBUILD_SLACK.total_seconds() + 1)


def run_protocol_only(args: argparse.Namespace, workdir: Path) -> int:
    from tests.push.stack import PortalServer

    portal, agents = None, []
    try:
        seeding = time.perf_counter()
        key, listener_ids, tokens = seed(args.vips, args.agents)
        print(
            f"seeded {args.vips} VIPs x 1 listener x 4 backends, {args.agents} agents "
            f"in {time.perf_counter() - seeding:.1f} s"
        )
        portal = PortalServer(env=portal_env(), workdir=workdir)
        portal.start()
        agents = protocol_agents(tokens, portal, workdir)
        for agent in agents:
            agent.start()
        wait_synced(lambda: agents[0].log()[-2000:], 120)
        deadline = time.monotonic() + 120
        while not agents[0].cache_file.exists():  # agents persist their state within 0.5 s
            if time.monotonic() > deadline:
                raise SystemExit(f"agent wrote no state cache: {agents[0].log()[-2000:]}")
            time.sleep(0.1)
        document_bytes = agents[0].cache_file.stat().st_size
        warm_up = TenantClient(portal.http_url, key)
        warm_up.put_backends(listener_ids[0], [{"address": "10.201.0.1", "port": 8080}])
        warm_up.close()
        steady_state_pause()
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
        print_machine()
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
    return 0


KERNEL_PORTS = (80, 443, 8080, 8443)  # 4 listeners per VIP, as bench/mux_scale.py loads


def run_kernel(args: argparse.Namespace, workdir: Path) -> int:
    """The lab's real kernel muxes (`lbagent run --portal`, nftables in each mux namespace) next
    to protocol-only agents under the same names, same portal, same documents, same run."""
    from lbagent.lab import topology
    from tests.lab.portal_stack import PortalLink, PortalMux
    from tests.push.stack import PortalServer

    class KernelMux(PortalMux):
        """Portal-mode daemon without BGP: this measures tables applied, not routes."""

        def start(self) -> None:
            argv = [sys.executable, "-m", "lbagent.daemon", "--portal", self.portal_url,
                    "--token-file", str(self.token_file), "--node", self.mux.name,
                    "--config", str(self.config), "--metrics", "127.0.0.1:9109", "--run-dir", str(self.dir)]
            self.proc = self.lab.spawn(self.key, self.mux.netns, argv, log_name=self.log_name)

    lab = topology.build(mux_count=args.agents, backend_count=8, with_bird=False)
    link, portal, agents, muxes = PortalLink(lab), None, [], []
    try:
        link.up()
        backends = lab.backends[:8]

        def backends_of(_index: int) -> list[dict]:
            return [{"address": b.address, "port": 80, "weight": 1, "admin_state": "active", "host": None}
                    for b in backends]

        changes = iter(range(1, 1_000_000))

        def change_backends(_change: int) -> list[dict]:
            # One of the eight backends moves to a port no change used before: always a real change
            # (a new backend, a transition), in both phases, whichever listener the draw picks.
            n = next(changes)
            return [{"address": b.address, "port": 1000 + n if k == n % 8 else 80}
                    for k, b in enumerate(backends)]

        seeding = time.perf_counter()
        key, listener_ids, tokens = seed(args.vips, {m.name: m.address for m in lab.muxes},
                                         ports=KERNEL_PORTS, backends_of=backends_of,
                                         table_size=args.table_size)
        print(f"seeded {args.vips} VIPs x {len(KERNEL_PORTS)} listeners x 8 backends, table size "
              f"{args.table_size}, {args.agents} muxes in {time.perf_counter() - seeding:.1f} s")
        portal = PortalServer(env=portal_env(link.portal_address), workdir=workdir, host=link.portal_address)
        portal.start()
        figures = {}

        # 1. protocol-only agents under the muxes' names (root namespace, no data plane)
        agents = protocol_agents(tokens, portal, workdir)
        for agent in agents:
            agent.start()
        wait_synced(lambda: agents[0].log()[-2000:], 300)
        steady_state_pause()
        client = TenantClient(portal.http_url, key)
        # The same bound as the kernel phase: a stalled change is a figure, not an abort.
        figures["protocol"] = asyncio.run(measure(client, listener_ids, args.changes, args.pause,
                                                  backends_for=change_backends, timeout_s=args.load_timeout))
        client.close()
        for agent in agents:
            agent.stop()
        agents = []

        # 2. the same names as kernel muxes in the lab's namespaces: a full load, then the changes
        muxes = [KernelMux(lab, m, portal_url=portal.ws_url, token=tokens[m.name]) for m in lab.muxes]
        loading = time.perf_counter()
        for mux in muxes:
            mux.start()
        # The protocol-only agents acknowledged the same generation under these names: wait for
        # each daemon's own report of it (its metrics), then for the portal's record of the acks.
        from datacenter.loadbalancing.models_sync import PushSettings

        wanted = PushSettings.objects.get(pk=1).generation
        for mux in muxes:
            mux.wait_applied(wanted, timeout_s=args.load_timeout)
        wait_synced(lambda: " | ".join(m.log_tail(800) for m in muxes), args.load_timeout)
        print(f"kernel muxes loaded {args.vips * len(KERNEL_PORTS)} listeners each in "
              f"{time.perf_counter() - loading:.1f} s (all {args.agents} in parallel on this machine)")
        steady_state_pause()
        # channels_redis keeps its connections per event loop: a fresh layer for the new loop
        from channels.layers import channel_layers

        channel_layers.backends.clear()
        client = TenantClient(portal.http_url, key)
        figures["kernel"] = asyncio.run(measure(client, listener_ids, args.changes, args.pause,
                                                backends_for=change_backends, timeout_s=args.load_timeout))
        client.close()

        print_machine()
        agent_apply_breakdown(lab, muxes, after_generation=wanted)
        kernel = summarize(f"API call -> all {args.agents} kernel muxes applied (nft committed) and "
                           f"acknowledged (ACTIVE), {args.changes} changes", *figures["kernel"])
        proto = summarize("same run, same documents, protocol-only agents under the same names",
                          *figures["protocol"])
        print(f"kernel over protocol-only: p50 +{kernel['p50'] - proto['p50']:.1f} ms "
              f"(ratio {kernel['p50'] / proto['p50']:.2f}x); goal p50 < 150 ms at 1,000 VIPs x 4 x 8")
    finally:
        for agent in agents:
            agent.stop()
        for mux in muxes:
            if mux.alive():
                mux.stop(timeout_s=60)
        if portal is not None:
            portal.stop()
        link.down()
        topology.teardown(lab)
    return 0


def agent_apply_breakdown(lab, muxes, *, after_generation: int) -> None:
    """Where a change's time goes on the muxes, from their logs: the portal client's apply
    (document received and decoded -> the daemon reports it in the kernel) and, inside it, the
    daemon's apply (planning, the kernel transaction, saving its state)."""
    import re

    client = re.compile(r"lbagent\.portal INFO applied generation (\d+) \(\d+ VIPs\) in ([\d.]+) ms")
    daemon = re.compile(r"applied generation (\d+): .* in ([\d.]+) s \((\d+) VIP\(s\) planned, (\d+) "
                        r"listener\(s\) written; ([\d.]+) s in all")
    for mux in muxes:
        text = (Path(lab.run_dir) / mux.log_name).read_text(errors="replace")
        bridge = [float(ms) for g, ms in client.findall(text) if int(g) > after_generation]
        rows = [(float(k), int(v), int(w), float(t)) for g, k, v, w, t in daemon.findall(text)
                if int(g) > after_generation]
        if not bridge or not rows:
            print(f"{mux.mux.name}: no applies after generation {after_generation} in its log")
            continue
        print(f"{mux.mux.name}: agent apply (received -> in the kernel) p50 "
              f"{statistics.median(bridge):.1f} ms, p95 {percentile(bridge, 0.95):.1f} ms over "
              f"{len(bridge)} documents; daemon apply p50 "
              f"{statistics.median(r[3] for r in rows) * 1000:.1f} ms (kernel transaction p50 "
              f"{statistics.median(r[0] for r in rows) * 1000:.1f} ms), VIPs planned per apply "
              f"max {max(r[1] for r in rows)}, listeners written per apply max {max(r[2] for r in rows)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vips", type=int, default=1000)
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--changes", type=int, default=60)
    parser.add_argument(
        "--pause", type=float, default=0.0, help="seconds between one change's ACTIVE and the next call"
    )
    parser.add_argument("--kernel", action="store_true",
                        help="the lab's real kernel muxes (root; builds a lab) next to protocol-only agents")
    parser.add_argument("--table-size", type=int, default=6421,
                        help="--kernel: the cluster's Maglev table size (6,421 = a backend cap of 64)")
    parser.add_argument("--load-timeout", type=float, default=1800,
                        help="--kernel: seconds allowed for the muxes' first full load")
    args = parser.parse_args()
    base_db, redis_url = os.environ.get("DATABASE_URL", ""), os.environ.get("REDIS_URL", "")
    if not base_db.startswith("postgres") or not redis_url:
        print("bench/propagation.py needs DATABASE_URL (PostgreSQL) and REDIS_URL", file=sys.stderr)
        return 2
    if args.kernel and os.geteuid() != 0:
        print("bench/propagation.py --kernel needs root (it builds a lab of network namespaces)",
              file=sys.stderr)
        return 2
    db_name = f"bench_push_{os.getpid()}"
    create_database(base_db, db_name)
    os.environ["DATABASE_URL"] = scratch_database_url(base_db, db_name)
    os.environ.setdefault("DJANGO_SECRET_KEY", secrets.token_urlsafe(50))
    import django

    django.setup()
    workdir = Path(tempfile.mkdtemp(prefix="bench-push-"))
    try:
        return run_kernel(args, workdir) if args.kernel else run_protocol_only(args, workdir)
    finally:
        from django.db import connections

        connections.close_all()
        create_database(base_db, db_name, drop=True)


if __name__ == "__main__":
    sys.exit(main())
