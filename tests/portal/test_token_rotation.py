"""Token rotation with a grace window: the old and the new credential both work until the window
ends, then only the new one; the new key is shown once. The end of a window is reached by moving
its deadline into the past (what the clock would do), never by sleeping."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from datacenter.loadbalancing.models import AgentNode
from datacenter.tenancy.models import ApiToken, RetiredKey
from datacenter.testing import new_agent


def _client_with(world, key):
    client = world.client("a_member")
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    return client


def test_api_token_rotation_keeps_both_working_until_the_window_ends(world):
    old_key = world.keys["a_member"]
    old = ApiToken.objects.get(user=world.users["a_member"])
    answer = _client_with(world, old_key).post(f"/api/tokens/{old.pk}/rotate/?grace_s=600")
    assert answer.status_code == 201, answer.content
    new_key = answer.json()["key"]
    assert new_key != old_key
    assert answer.json()["name"] == old.name
    assert _client_with(world, old_key).get("/api/vips/").status_code == 200
    assert _client_with(world, new_key).get("/api/vips/").status_code == 200
    old.refresh_from_db()
    assert timezone.now() + timedelta(seconds=590) < old.expires <= timezone.now() + timedelta(seconds=600)
    ApiToken.objects.filter(pk=old.pk).update(expires=timezone.now() - timedelta(seconds=1))  # window over
    assert _client_with(world, old_key).get("/api/vips/").status_code == 401
    assert _client_with(world, new_key).get("/api/vips/").status_code == 200
    assert "key" not in _client_with(world, new_key).get(f"/api/tokens/{answer.json()['id']}/").json()


def test_api_token_rotation_with_no_grace_revokes_at_once_and_bad_grace_is_named(world):
    old_key = world.keys["a_member"]
    old = ApiToken.objects.get(user=world.users["a_member"])
    bad = _client_with(world, old_key).post(f"/api/tokens/{old.pk}/rotate/?grace_s=soon")
    assert bad.status_code == 400
    assert "grace_s" in bad.json()
    answer = _client_with(world, old_key).post(f"/api/tokens/{old.pk}/rotate/?grace_s=0")
    assert answer.status_code == 201
    assert _client_with(world, old_key).get("/api/vips/").status_code == 401
    assert _client_with(world, answer.json()["key"]).get("/api/vips/").status_code == 200


def test_a_member_cannot_rotate_someone_elses_token(world):
    theirs = ApiToken.objects.get(user=world.users["b_member"])
    assert world.client("a_member").post(f"/api/tokens/{theirs.pk}/rotate/").status_code == 404


@pytest.mark.django_db
def test_agent_token_rotation_keeps_the_old_token_for_the_grace_window(world):
    node, old_key = new_agent("rot-mux-1", world.host_shared, "10.0.0.9")
    answer = world.client("operator").post(f"/api/agent-nodes/{node.pk}/rotate-token/?grace_s=300")
    assert answer.status_code == 200, answer.content
    new_key = answer.json()["token"]
    assert AgentNode.authenticate(old_key) == node  # a connected agent is not dropped ...
    assert AgentNode.authenticate(new_key) == node  # ... and can switch to the new token
    RetiredKey.objects.filter(owner_id=node.pk).update(valid_until=timezone.now() - timedelta(seconds=1))
    assert AgentNode.authenticate(old_key) is None
    assert AgentNode.authenticate(new_key) == node
    AgentNode.objects.filter(pk=node.pk).update(enabled=False)
    assert AgentNode.authenticate(new_key) is None


def test_agent_token_rotation_without_grace_drops_the_old_token(world):
    node, old_key = new_agent("rot-mux-2", world.host_shared, "10.0.0.10")
    answer = world.client("operator").post(f"/api/agent-nodes/{node.pk}/rotate-token/?grace_s=0")
    assert answer.status_code == 200
    assert AgentNode.authenticate(old_key) is None
    assert AgentNode.authenticate(answer.json()["token"]) == node
    assert not RetiredKey.objects.filter(owner_id=node.pk).exists()
