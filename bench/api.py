"""Portal API latency: VIP list and backend replace next to a trivial endpoint, in one run.

Seeds 1,000 VIPs x 4 listeners x 8 backends (bulk_create) into a throwaway database
(`bench_<name>` next to the one DATABASE_URL names; SQLite: in memory), then drives the full
Django + DRF stack in-process with a tenant's API token and prints p50/p95 per call and the ratio
to the trivial endpoint (GET /api/status/: auth + middleware + DRF, no domain work).

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/datacenter .venv/bin/python bench/api.py
    options: --requests 200 --vips 1000
    --ab: instead, interleave requests A B A B ... in one process, A with main's serialisation
          (DRF's own HyperlinkedIdentityField, DateTimeField and field walk) and B with this
          code's, and backend replaces without / with the operating-status recompute: the ratio
          B/A holds on a machine whose load moves between runs.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "datacenter.settings")
os.environ.setdefault("DATACENTER_LOG_LEVEL", "WARNING")

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from django.db import connection  # noqa: E402
from django.test import Client  # noqa: E402
from django.test.utils import setup_test_environment  # noqa: E402

LISTENERS_PER_VIP = 4
BACKENDS_PER_LISTENER = 8


def seed(vip_count: int) -> tuple[str, list[int]]:
    from django.contrib.auth import get_user_model

    from datacenter.loadbalancing.models import Backend, Listener, Vip, VipPool
    from datacenter.tenancy.models import ApiToken, Membership, Tenant

    tenant = Tenant.objects.create(
        name="Bench", slug="bench", max_vips=vip_count, max_backends_per_listener=BACKENDS_PER_LISTENER * 2
    )
    user = get_user_model().objects.create_user("bench")
    Membership.objects.create(user=user, tenant=tenant, role="member")
    _, key = ApiToken.objects.create_token(user, name="bench")
    pool = VipPool.objects.create(name="bench", prefix="100.64.0.0/16")
    pool.tenants.add(tenant)
    vips = Vip.objects.bulk_create(
        Vip(tenant=tenant, pool=pool, name=f"vip-{i}", address=f"100.64.{i // 250}.{i % 250 + 1}")
        for i in range(vip_count)
    )
    listeners = Listener.objects.bulk_create(
        Listener(vip=vip, port=80 + n) for vip in vips for n in range(LISTENERS_PER_VIP)
    )
    Backend.objects.bulk_create(
        (
            Backend(
                listener=listener, position=b, address=f"10.{(i // 250) % 250}.{i % 250}.{b + 1}", port=8080
            )
            for i, listener in enumerate(listeners)
            for b in range(BACKENDS_PER_LISTENER)
        ),
        batch_size=5000,
    )
    return key, [listener.pk for listener in listeners]


def measure(call, count: int, warmup: int = 10) -> list[float]:
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def measure_interleaved(
    call, setups: tuple[tuple[object, object], tuple[object, object]], count: int, warmup: int = 5
) -> tuple[list[float], list[float]]:
    """`count` requests each for A and B, alternating (setup, teardown) pairs per request."""
    out: tuple[list[float], list[float]] = ([], [])
    for index in range(2 * (count + warmup)):
        which = index % 2
        enter, leave = setups[which]
        enter()
        try:
            started = time.perf_counter()
            call()
            elapsed = (time.perf_counter() - started) * 1000
        finally:
            leave()
        if index >= 2 * warmup:
            out[which].append(elapsed)
    return out


def stock_serializer(serializer_class, view_name: str):
    """The serializer as main has it: DRF's own url field, DateTimeField and field walk."""
    from rest_framework import serializers as drf

    return type(
        f"Stock{serializer_class.__name__}",
        (serializer_class,),
        {
            "url": drf.HyperlinkedIdentityField(view_name=view_name),
            "serializer_field_mapping": drf.ModelSerializer.serializer_field_mapping,
            "_readable_fields": drf.Serializer._readable_fields,
        },
    )


def run_ab(client, listener_ids: list[int], count: int, rng: random.Random) -> None:
    from datacenter.loadbalancing import agent_sync
    from datacenter.loadbalancing.api import serializers, views

    ours = views.VipViewSet.serializer_class
    stock = stock_serializer(ours, "loadbalancing-api:vip-detail")

    def use(cls):
        return lambda: setattr(views.VipViewSet, "serializer_class", cls)

    serializer_ab = ((use(stock), use(ours)), (use(ours), use(ours)))
    recompute = agent_sync.update_operating_status
    status_ab = (
        (lambda: setattr(agent_sync, "update_operating_status", lambda ids: None),
         lambda: setattr(agent_sync, "update_operating_status", recompute)),
        (lambda: None, lambda: None),
    )

    def vip_page():
        response = client.get("/api/vips/")
        assert response.status_code == 200, response.content[:300]

    def vip_list_1000():
        response = client.get("/api/vips/", {"limit": 1000})
        assert response.status_code == 200, response.content[:300]
        assert len(response.json()["results"]) == 1000

    def replace():
        listener = rng.choice(listener_ids)
        backends = [
            {"address": f"10.200.{listener % 250}.{b + 1}", "port": 8080, "weight": rng.randint(1, 4)}
            for b in range(BACKENDS_PER_LISTENER)
        ]
        response = client.put(
            f"/api/listeners/{listener}/backends/", {"backends": backends}, content_type="application/json"
        )
        assert response.status_code == 200, response.content[:300]

    assert serializers.VipSerializer is ours
    # The seed's rows never had their operating status computed (bulk_create): settle them, or
    # B's first replace of each listener also writes its new status and publishes the events
    # (work main skipped, which is the bug), rather than the steady-state read.
    recompute(listener_ids)
    rows = [
        ("GET /api/vips/ (page of 50)", measure_interleaved(vip_page, serializer_ab, count)),
        ("GET /api/vips/?limit=1000", measure_interleaved(vip_list_1000, serializer_ab, max(20, count // 5))),
        ("PUT .../backends/ (status recompute)", measure_interleaved(replace, status_ab, count)),
    ]
    print(f"interleaved A/B, {count} requests per side (1,000-VIP list: {max(20, count // 5)})")
    print(f"{'call':40} {'A p50':>8} {'B p50':>8} {'A p95':>8} {'B p95':>8} {'B/A p50':>8}")
    for name, (a, b) in rows:
        a50, b50 = statistics.median(a), statistics.median(b)
        print(
            f"{name:40} {a50:8.2f} {b50:8.2f} {percentile(a, 0.95):8.2f} {percentile(b, 0.95):8.2f} "
            f"{b50 / a50:8.2f}"
        )


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--vips", type=int, default=1000)
    parser.add_argument("--ab", action="store_true", help="interleaved main/this-code comparison")
    args = parser.parse_args()

    db = settings.DATABASES["default"]
    db["TEST"]["NAME"] = None if db["ENGINE"].endswith("sqlite3") else f"bench_{db['NAME']}"
    setup_test_environment()
    old_name = connection.creation.create_test_db(verbosity=0, autoclobber=True, keepdb=False)
    try:
        started = time.perf_counter()
        key, listener_ids = seed(args.vips)
        seed_s = time.perf_counter() - started
        client = Client(HTTP_AUTHORIZATION=f"Token {key}")
        rng = random.Random(7)
        if args.ab:
            print(f"database: {connection.vendor}; seeded {args.vips} VIPs in {seed_s:.1f} s")
            run_ab(client, listener_ids, args.requests, rng)
            return

        def check(response, status=200):
            assert response.status_code == status, (response.status_code, response.content[:300])

        def trivial():
            check(client.get("/api/status/"))

        def vip_page():
            check(client.get("/api/vips/"))

        def vip_list_1000():
            check(client.get("/api/vips/", {"limit": 1000}))

        def replace():
            listener = rng.choice(listener_ids)
            backends = [
                {"address": f"10.200.{listener % 250}.{b + 1}", "port": 8080, "weight": rng.randint(1, 4)}
                for b in range(BACKENDS_PER_LISTENER)
            ]
            check(
                client.put(
                    f"/api/listeners/{listener}/backends/",
                    {"backends": backends},
                    content_type="application/json",
                )
            )

        def replace_dry_run():
            listener = rng.choice(listener_ids)
            backends = [{"address": f"10.201.0.{b + 1}", "port": 8080} for b in range(BACKENDS_PER_LISTENER)]
            check(
                client.put(
                    f"/api/listeners/{listener}/backends/?dry_run=true",
                    {"backends": backends},
                    content_type="application/json",
                )
            )

        results = [("GET /api/status/ (baseline)", measure(trivial, args.requests))]
        results.append(("GET /api/vips/ (page of 50)", measure(vip_page, args.requests)))
        results.append(("GET /api/vips/?limit=1000", measure(vip_list_1000, max(20, args.requests // 10))))
        results.append(("PUT /api/listeners/{id}/backends/", measure(replace, args.requests)))
        results.append(("PUT .../backends/?dry_run=true", measure(replace_dry_run, args.requests)))
        baseline_p50 = statistics.median(results[0][1])

        print(
            f"database: {connection.vendor}; seeded {args.vips} VIPs x {LISTENERS_PER_VIP} listeners x "
            f"{BACKENDS_PER_LISTENER} backends in {seed_s:.1f} s; in-process Django test client, "
            f"{args.requests} requests per call"
        )
        print(f"{'call':40} {'p50 ms':>8} {'p95 ms':>8} {'p50/baseline':>13}")
        for name, samples in results:
            p50 = statistics.median(samples)
            print(f"{name:40} {p50:8.2f} {percentile(samples, 0.95):8.2f} {p50 / baseline_p50:12.1f}x")
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)


if __name__ == "__main__":
    main()
