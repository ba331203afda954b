"""Throttling: API calls per token and login attempts, answered 429 with Retry-After.

Rates are settings read per request, so each test sets a tiny one. Counters are keyed by token
and by user name, and each test uses new ones (never clearing the cache: with Redis that would
empty the database other tests' workers use).
"""

from __future__ import annotations

import uuid

import pytest

from datacenter.api.throttling import parse_rate
from datacenter.testing import make_user


def test_each_token_has_its_own_budget_and_hears_when_to_retry(world, settings):
    settings.DATACENTER_API_TOKEN_RATE = "3/min"
    member, viewer = world.client("a_member"), world.client("a_viewer")
    assert [member.get("/api/vips/").status_code for _ in range(3)] == [200, 200, 200]
    refused = member.get("/api/vips/")
    assert refused.status_code == 429
    assert 1 <= int(refused["Retry-After"]) <= 60
    assert "throttled" in refused.json()["detail"]
    assert viewer.get("/api/vips/").status_code == 200  # another token is not affected


def test_the_default_token_rate_is_off_the_suites_path(world, settings):
    count, window_s = parse_rate(settings.DATACENTER_API_TOKEN_RATE)
    assert count / window_s >= 100  # per second per token: far above what any test or bench sends
    assert all(world.client("a_member").get("/api/status/").status_code == 200 for _ in range(20))


def test_rate_off_disables_and_a_bad_rate_names_itself(world, settings):
    settings.DATACENTER_API_TOKEN_RATE = "off"
    assert all(world.client("a_member").get("/api/status/").status_code == 200 for _ in range(10))
    expected = r"throttle rate '10/fortnight': expected '<count>/<s\|min\|hour\|day>'"
    with pytest.raises(ValueError, match=expected):
        parse_rate("10/fortnight")


@pytest.mark.django_db
def test_login_guesses_are_throttled_before_the_password_is_checked(client, settings):
    settings.DATACENTER_LOGIN_RATE = "2/min"
    name = f"ops-{uuid.uuid4().hex[:8]}"
    make_user(name, password="right-password-123")
    wrong = {"username": name, "password": "wrong"}
    assert [client.post(settings.LOGIN_URL, wrong).status_code for _ in range(2)] == [200, 200]
    refused = client.post(settings.LOGIN_URL, {"username": name, "password": "right-password-123"})
    assert refused.status_code == 429  # even the right password: guessing faster gains nothing
    assert 1 <= int(refused["Retry-After"]) <= 60
    assert "_auth_user_id" not in client.session
    # another user name from the same address still has its own budget
    other = f"other-{uuid.uuid4().hex[:8]}"
    make_user(other, password="right-password-456")
    ok = client.post(settings.LOGIN_URL, {"username": other, "password": "right-password-456"})
    assert ok.status_code == 302
