"""Dashboard speed: server time of the overview, VIP list and VIP pages next to GET /api/status/
in the same run, and the time from a REST change to a browser showing it.

Seeds 1,000 VIPs x 4 listeners x 8 backends (bench/api.py's seed) and 4 mux agents that are
connected, acknowledged every listener and reported counters, into a throwaway database
(`bench_<name>` next to the one DATABASE_URL names). Part 1 drives the pages in-process with
Django's test client as an operator (server time: view + template, no network). Part 2 (needs
REDIS_URL and /usr/bin/chromium) runs the portal under uvicorn on that database with the Redis
channel layer, opens a VIP page in headless Chromium, then 50 times changes the VIP's backends
through the REST API and measures until the new backend's row is on the screen; the REST call
alone is its same-run baseline.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/datacenter REDIS_URL=redis://127.0.0.1:6379/0 \
        .venv/bin/python bench/dashboard.py       options: --requests 100 --vips 1000 --changes 50
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "datacenter.settings")
os.environ.setdefault("DATACENTER_LOG_LEVEL", "WARNING")

import api as api_bench  # noqa: E402 - bench/api.py: the same seed as the API benchmark (sets Django up)
from django.conf import settings  # noqa: E402
from django.db import connection  # noqa: E402
from django.test import Client  # noqa: E402
from django.test.utils import setup_test_environment  # noqa: E402

AGENTS = 4
PASSWORD = "bench-password-not-secret"
CHROMIUM = "/usr/bin/chromium"


def seed_agents(listener_ids: list[int]) -> None:
    """4 muxes, connected, each having acknowledged every listener's table, with counters."""
    from django.utils import timezone

    from datacenter.inventory.models import Host
    from datacenter.loadbalancing import agent_sync
    from datacenter.loadbalancing.models import AgentListenerAck, AgentNode, AgentSync, ListenerTable
    from datacenter.loadbalancing.models_sync import PushSettings

    PushSettings.objects.get_or_create(pk=1)
    agent_sync.refresh_tables(None)  # every listener's table, as the portal keeps them
    numbers = dict(ListenerTable.objects.values_list("listener_id", "number"))
    host = Host.objects.create(name="lb-bench", management_address="10.0.0.2", roles=["lb-node"])
    for n in range(AGENTS):
        agent = AgentNode.objects.create(
            name=f"mux-{n}",
            host=host,
            role="mux",
            address=f"10.0.0.{n + 2}",
            last_seen=timezone.now(),
            applied_generation=1,
            last_stats={"packets": 10**9 + n, "new_flows": 10**7, "slowpath_decisions": 0, "flow_records": 0},
        )
        AgentSync.objects.create(agent=agent, connected=True, version="bench", connected_at=timezone.now())
        AgentListenerAck.objects.bulk_create(
            (
                AgentListenerAck(agent=agent, listener_id=lid, generation=numbers.get(lid, 1))
                for lid in listener_ids
            ),
            batch_size=5000,
        )


def operator_client() -> Client:
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.create_user("bench-operator", is_staff=True, is_superuser=True)
    user.set_password(PASSWORD)
    user.save()
    client = Client()
    client.force_login(user)
    return client


def server_times(client: Client, api_key: str, requests: int) -> list[tuple[str, list[float]]]:
    from datacenter.loadbalancing.models import Vip

    vip_ids = list(Vip.objects.values_list("pk", flat=True))
    rng = random.Random(7)
    api = Client(HTTP_AUTHORIZATION=f"Token {api_key}")

    def get(c: Client, url: str):
        def call():
            response = c.get(url() if callable(url) else url)
            assert response.status_code == 200, (response.status_code, response.content[:300])

        return call

    return [
        ("GET /api/status/ (baseline)", api_bench.measure(get(api, "/api/status/"), requests)),
        ("GET / (overview)", api_bench.measure(get(client, "/"), requests)),
        ("GET /vips/ (page of 50)", api_bench.measure(get(client, "/vips/"), requests)),
        (
            "GET /vips/<id>/ (4 listeners)",
            api_bench.measure(get(client, lambda: f"/vips/{rng.choice(vip_ids)}/"), requests),
        ),
        ("GET /agents/ (4 muxes)", api_bench.measure(get(client, "/agents/"), requests)),
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def change_to_screen(api_key: str, changes: int) -> tuple[list[float], list[float]] | str:
    """(change-to-screen ms, REST call ms) per change, or why it was skipped."""
    if not os.environ.get("REDIS_URL"):
        return "skipped: needs REDIS_URL (the portal process and this one share the channel layer)"
    if not os.path.exists(CHROMIUM):
        return f"skipped: needs {CHROMIUM}"
    from playwright.sync_api import sync_playwright

    from datacenter.loadbalancing.models import Listener

    listener = Listener.objects.select_related("vip").order_by("pk").first()
    db = settings.DATABASES["default"]
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(
        DATABASE_URL=urlunsplit(urlsplit(os.environ["DATABASE_URL"])._replace(path="/" + db["NAME"])),
        DJANGO_SECRET_KEY=settings.SECRET_KEY,
        DATACENTER_EMBEDDED_WORKER="0",
        DATACENTER_LOG_LEVEL="WARNING",
    )
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="bench-dashboard-", suffix=".log", delete=False)  # noqa: SIM115
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "datacenter.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--lifespan",
            "off",
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    return f"skipped: the portal did not start (log {log.name})"
                time.sleep(0.1)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM,
                headless=True,
                args=["--no-sandbox", "--disable-background-networking"],
            )
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(60_000)
            page.goto(base + "/login/")
            page.get_by_label("Username").fill("bench-operator")
            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Log in").click()
            page.wait_for_url(base + "/")
            page.goto(f"{base}/vips/{listener.vip_id}/")
            page.wait_for_function("window.dashboard && window.dashboard.connected")
            to_screen, rest = [], []
            for n in range(changes):
                backends = [{"address": f"10.250.0.{b + 1}", "port": 8080} for b in range(7)]
                backends.append({"address": "10.250.1.1", "port": 10000 + n})
                request = urllib.request.Request(
                    f"{base}/api/listeners/{listener.pk}/backends/",
                    data=json.dumps({"backends": backends}).encode(),
                    method="PUT",
                    headers={"Authorization": f"Token {api_key}", "Content-Type": "application/json"},
                )
                started = time.perf_counter()
                with urllib.request.urlopen(request, timeout=60) as response:
                    assert response.status == 200
                answered = time.perf_counter()
                page.wait_for_selector(
                    f'tr.backend-row[data-backend="10.250.1.1:{10000 + n}"]', state="attached"
                )
                shown = time.perf_counter()
                rest.append((answered - started) * 1000)
                to_screen.append((shown - started) * 1000)
            browser.close()
        return to_screen, rest
    finally:
        if server.poll() is None:
            os.kill(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(server.pid, signal.SIGKILL)
                server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--vips", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=50)
    args = parser.parse_args()

    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("sqlite3"):
        raise SystemExit(
            "bench/dashboard.py: needs PostgreSQL (DATABASE_URL): the browser part shares the database"
        )
    db["TEST"]["NAME"] = f"bench_{db['NAME']}"
    setup_test_environment()
    old_name = connection.creation.create_test_db(verbosity=0, autoclobber=True, keepdb=False)
    try:
        started = time.perf_counter()
        key, listener_ids = api_bench.seed(args.vips)
        seed_agents(listener_ids)
        seed_s = time.perf_counter() - started
        client = operator_client()
        results = server_times(client, key, args.requests)
        baseline = statistics.median(results[0][1])
        print(
            f"database: {connection.vendor}; seeded {args.vips} VIPs x {api_bench.LISTENERS_PER_VIP} "
            f"listeners x {api_bench.BACKENDS_PER_LISTENER} backends and {AGENTS} muxes in {seed_s:.1f} s; "
            f"in-process test client as an operator, {args.requests} requests per page"
        )
        print(f"{'page':34} {'p50 ms':>8} {'p95 ms':>8} {'p50/baseline':>13}")
        for name, samples in results:
            p50 = statistics.median(samples)
            print(f"{name:34} {p50:8.2f} {api_bench.percentile(samples, 0.95):8.2f} {p50 / baseline:12.1f}x")
        outcome = change_to_screen(key, args.changes)
        if isinstance(outcome, str):
            print(f"change to screen: {outcome}")
        else:
            to_screen, rest = outcome
            print(f"change to screen over {len(to_screen)} REST changes (uvicorn, Redis layer, Chromium):")
            print(f"{'':34} {'p50 ms':>8} {'p95 ms':>8}")
            print(
                f"{'REST PUT answered (baseline)':34} {statistics.median(rest):8.1f} "
                f"{api_bench.percentile(rest, 0.95):8.1f}"
            )
            print(
                f"{'new backend row on screen':34} {statistics.median(to_screen):8.1f} "
                f"{api_bench.percentile(to_screen, 0.95):8.1f}   "
                f"({statistics.median(to_screen) / statistics.median(rest):.1f}x the REST call)"
            )
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)


if __name__ == "__main__":
    main()
