"""Two clients replacing one listener's backends at once with the same precondition: one wins.

Real concurrency needs real transactions in separate connections, so this runs on PostgreSQL
(the suite's database in CI); the row lock in services.replace_backends serialises the writers and
the loser gets StaleGeneration (409) instead of a duplicate generation or a lost update.
"""

from __future__ import annotations

import threading

from django.db import connection

from datacenter.loadbalancing import services
from datacenter.loadbalancing.models import Generation, Listener
from datacenter.services_errors import StaleGeneration
from datacenter.testing import build_world
from tests.environment import need


def test_concurrent_replaces_with_the_same_generation_one_wins(transactional_db):
    need(connection.vendor == "postgresql", "row-lock concurrency needs PostgreSQL (set DATABASE_URL)")
    world = build_world()
    listener = world.listener_a
    seen = listener.generation
    barrier = threading.Barrier(2, timeout=10)
    outcomes: dict[str, object] = {}

    def writer(name: str, address: str) -> None:
        from django.db import connection as thread_connection

        try:
            barrier.wait()
            result = services.replace_backends(
                Listener.objects.get(pk=listener.pk),
                [{"address": address, "port": 80}],
                expected_generation=seen,
            )
            outcomes[name] = result.generation.number
        except StaleGeneration as exc:
            outcomes[name] = exc
        finally:
            thread_connection.close()

    threads = [
        threading.Thread(target=writer, args=(n, a)) for n, a in (("one", "10.1.0.31"), ("two", "10.1.0.32"))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert not any(t.is_alive() for t in threads)
    winners = [v for v in outcomes.values() if isinstance(v, int)]
    losers = [v for v in outcomes.values() if isinstance(v, StaleGeneration)]
    assert winners == [seen + 1], outcomes
    assert len(losers) == 1
    assert losers[0].http_status == 409
    assert losers[0].current == seen + 1
    assert Listener.objects.get(pk=listener.pk).generation == seen + 1
    assert Generation.objects.filter(listener=listener).count() == seen + 1
