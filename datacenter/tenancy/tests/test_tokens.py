"""API tokens: hashed at rest, shown once, expiry, read-only, last_used."""

from __future__ import annotations

from datetime import timedelta

from django.utils import timezone
from rest_framework.test import APIClient

from datacenter.tenancy.models import ApiToken, hash_token_key


def _client(key: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    return client


def test_token_key_is_shown_once_and_only_its_hash_is_stored(world):
    created = world.client("a_member").post(
        "/api/tokens/", {"name": "ci", "write_enabled": False}, format="json"
    )
    assert created.status_code == 201, created.content
    key = created.json()["key"]
    token = ApiToken.objects.get(pk=created.json()["id"])
    assert token.key_hash == hash_token_key(key)
    assert not ApiToken.objects.filter(key_hash__contains=key[4:]).exists()
    listed = world.client("a_member").get(f"/api/tokens/{token.pk}/").json()
    assert "key" not in listed
    assert listed["key_prefix"] == key[:12]
    whoami = _client(key).get("/api/whoami/").json()
    assert whoami["username"] == "a_member"
    assert whoami["token_write_enabled"] is False
    assert whoami["memberships"] == [{"tenant": world.tenant_a.pk, "tenant_name": "Acme", "role": "member"}]


def test_expired_token_is_refused_and_last_used_is_recorded(world):
    token, key = ApiToken.objects.create_token(world.users["a_member"], name="old")
    assert _client(key).get("/api/status/").status_code == 200
    assert ApiToken.objects.get(pk=token.pk).last_used is not None
    token.expires = timezone.now() - timedelta(seconds=1)
    token.save()
    response = _client(key).get("/api/status/")
    assert response.status_code == 401
    assert response.json()["detail"] == "Token expired."


def test_users_see_only_their_own_tokens(world):
    listed = world.client("a_member").get("/api/tokens/").json()
    assert {t["user"] for t in listed["results"]} == {"a_member"}


def test_inactive_user_token_is_refused(world):
    user = world.users["a_member"]
    user.is_active = False
    user.save()
    assert world.client("a_member").get("/api/status/").status_code == 401
