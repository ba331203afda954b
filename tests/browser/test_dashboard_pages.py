"""The dashboard's pages on the server side (Django's test client, PostgreSQL): every page renders
for an operator, tenant isolation (404 for another tenant's objects, 403 for operator pages),
viewers get no forms and 403 when posting anyway, CSRF is enforced, the backend editor's
preview/apply/409, drain with confirmation, and a constant number of queries per page."""

from __future__ import annotations

import re

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from datacenter.loadbalancing import services
from datacenter.loadbalancing.models import Listener, Vip
from datacenter.testing import new_agent


def client_for(world, role: str, *, csrf: bool = False) -> Client:
    client = Client(enforce_csrf_checks=csrf)
    client.force_login(world.users[role])
    return client


def csrf_token(html: str) -> str:
    return re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', html).group(1)


def operator_pages(world) -> list[str]:
    listener = world.listener_a
    return [
        "/",
        "/vips/",
        f"/vips/{world.vip_a.pk}/",
        f"/vips/{world.vip_b.pk}/",
        "/agents/",
        "/hosts/",
        f"/hosts/{world.host_a.pk}/",
        "/tenants/",
        f"/tenants/{world.tenant_a.pk}/",
        "/pools/",
        f"/pools/{world.pool.pk}/",
        "/p2v/machines/",
        "/p2v/events/",
        "/p2v/jobs/",
        "/audit/",
        f"/vips/{world.vip_a.pk}/backends/{listener.backends.first().pk}/state/?to=draining",
    ]


def test_every_page_renders_for_an_operator(world):
    new_agent("mux-1", world.host_shared, "10.0.0.2")
    client = client_for(world, "operator")
    for url in operator_pages(world):
        response = client.get(url)
        assert response.status_code == 200, url
        html = response.content.decode()
        assert not re.search(r'(src|href)="https?://', html), f"{url}: every asset is served by the portal"
        assert 'data-live-page="' in html, url
    vip_page = client.get(f"/vips/{world.vip_a.pk}/").content.decode()
    assert "10.1.0.5:8080" in vip_page
    assert "10.1.0.6:8080" in vip_page
    # weights 1 and 2: the bucket shares come from the agents' Maglev builder (about 1/3 and 2/3)
    shares = [float(s) for s in re.findall(r'<td class="share">([\d.]+) %</td>', vip_page)]
    assert len(shares) == 2
    assert abs(shares[0] - 33.3) < 1.5
    assert abs(shares[1] - 66.7) < 1.5
    assert "mux-1" in vip_page, "the per-agent generation table lists every enabled mux"
    assert "Generation 1" in vip_page


def test_anonymous_users_are_sent_to_login(world):
    response = Client().get(f"/vips/{world.vip_a.pk}/")
    assert response.status_code == 302
    assert response["Location"].startswith("/login/")


def test_tenant_user_sees_only_their_tenant(world):
    client = client_for(world, "a_member")
    listing = client.get("/vips/").content.decode()
    assert world.vip_a.address in listing
    assert world.vip_b.address not in listing
    assert client.get(f"/vips/{world.vip_a.pk}/").status_code == 200
    assert client.get(f"/vips/{world.vip_b.pk}/").status_code == 404, "another tenant's VIP does not exist"
    assert client.get(f"/tenants/{world.tenant_b.pk}/").status_code == 404
    assert client.get(f"/hosts/{world.host_shared.pk}/").status_code == 404, "shared hosts are operators'"
    assert client.get(f"/pools/{world.pool_a_only.pk}/").status_code == 200
    for url in ("/agents/", "/p2v/machines/", "/p2v/events/", "/p2v/jobs/"):
        assert client.get(url).status_code == 403, url
    other = client_for(world, "b_member")
    assert other.get(f"/pools/{world.pool_a_only.pk}/").status_code == 404
    audit = client.get("/audit/").content.decode()
    assert "203.0.113.10" in audit
    assert "203.0.113.20" not in audit
    backend_b = world.listener_b.backends.first()
    edit = client.post(
        f"/vips/{world.vip_b.pk}/listeners/{world.listener_b.pk}/backends/",
        {"action": "apply", "expected_generation": 1, "address": ["10.2.0.9"], "port": ["80"]},
    )
    assert edit.status_code == 404
    assert client.get(f"/vips/{world.vip_b.pk}/backends/{backend_b.pk}/state/?to=draining").status_code == 404


def test_viewer_gets_no_forms_and_403_when_posting_anyway(world):
    viewer = client_for(world, "a_viewer")
    page = viewer.get(f"/vips/{world.vip_a.pk}/").content.decode()
    assert "backend-editor" not in page
    assert "?to=draining" not in page
    url = f"/vips/{world.vip_a.pk}/listeners/{world.listener_a.pk}/backends/"
    response = viewer.post(
        url, {"action": "apply", "expected_generation": 1, "address": ["10.1.0.9"], "port": ["80"]}
    )
    assert response.status_code == 403
    backend = world.listener_a.backends.first()
    state_url = f"/vips/{world.vip_a.pk}/backends/{backend.pk}/state/"
    assert viewer.post(state_url, {"to": "draining", "expected_generation": 1}).status_code == 403
    assert Listener.objects.get(pk=world.listener_a.pk).generation == 1


def test_posts_without_csrf_token_are_refused(world):
    client = client_for(world, "a_admin", csrf=True)
    url = f"/vips/{world.vip_a.pk}/listeners/{world.listener_a.pk}/backends/"
    assert client.post(url, {"action": "preview", "expected_generation": 1}).status_code == 403


def test_editor_preview_apply_and_stale_edit(world):
    client = client_for(world, "a_admin", csrf=True)
    page = client.get(f"/vips/{world.vip_a.pk}/").content.decode()
    url = f"/vips/{world.vip_a.pk}/listeners/{world.listener_a.pk}/backends/"
    rows = {
        "address": ["10.1.0.5", "10.1.0.6", "10.1.0.7", ""],
        "port": ["8080", "8080", "8080", ""],
        "weight": ["1", "2", "1", ""],
        "admin_state": ["active", "active", "active", "active"],
        "host": ["web-a1", "", "", ""],
        "expected_generation": "1",
        "csrfmiddlewaretoken": csrf_token(page),
    }
    fetch = {"HTTP_X_DASHBOARD_FETCH": "1"}
    preview = client.post(url, {**rows, "action": "preview"}, **fetch)
    assert preview.status_code == 200
    html = preview.content.decode()
    assert "Preview" in html
    assert "10.1.0.7:8080" in html
    moved = float(re.search(r'class="moved-share">([\d.]+) %', html).group(1))
    assert 15 < moved < 35, (
        f"adding a quarter of the weight moves about a quarter of the buckets, not {moved}"
    )
    assert Listener.objects.get(pk=world.listener_a.pk).generation == 1, "a preview writes nothing"
    applied = client.post(url, {**rows, "action": "apply"}, **fetch)
    assert applied.status_code == 200
    assert 'data-generation="2"' in applied.content.decode()
    assert Listener.objects.get(pk=world.listener_a.pk).backends.count() == 3
    stale = client.post(url, {**rows, "weight": ["5", "2", "1", ""], "action": "apply"}, **fetch)
    assert stale.status_code == 409
    assert "generation <strong>2</strong>" in stale.content.decode()
    assert Listener.objects.get(pk=world.listener_a.pk).backends.get(address="10.1.0.5").weight == 1
    bad = client.post(
        url,
        {**rows, "port": ["8080", "99999", "8080", ""], "expected_generation": "2", "action": "apply"},
        **fetch,
    )
    assert bad.status_code == 400
    assert "row 2" in bad.content.decode()


def test_drain_asks_for_confirmation_then_makes_a_generation(world):
    client = client_for(world, "a_member")
    backend = world.listener_a.backends.get(address="10.1.0.6")
    url = f"/vips/{world.vip_a.pk}/backends/{backend.pk}/state/"
    confirm = client.get(url + "?to=draining")
    assert confirm.status_code == 200
    assert "Drain backend" in confirm.content.decode()
    backend.refresh_from_db()
    assert backend.admin_state == "active", "opening the confirmation changes nothing"
    done = client.post(url, {"to": "draining", "expected_generation": 1})
    assert done.status_code == 302
    backend.refresh_from_db()
    assert backend.admin_state == "draining"
    stale = client.post(url, {"to": "disabled", "expected_generation": 1})
    assert stale.status_code == 409
    backend.refresh_from_db()
    assert backend.admin_state == "draining"


def test_rest_dry_run_reports_the_same_bucket_movement(world):
    api = world.client("a_admin")
    body = {
        "backends": [
            {"address": "10.1.0.5", "port": 8080, "host": "web-a1"},
            {"address": "10.1.0.6", "port": 8080, "weight": 2},
            {"address": "10.1.0.7", "port": 8080},
        ]
    }
    response = api.put(f"/api/listeners/{world.listener_a.pk}/backends/?dry_run=true", body, format="json")
    assert response.status_code == 200, response.content
    movement = response.json()["bucket_movement"]
    assert 0.15 < movement["moved_share"] < 0.35
    assert set(movement["shares_after"]) == {"10.1.0.5:8080", "10.1.0.6:8080", "10.1.0.7:8080"}
    assert abs(sum(movement["shares_after"].values()) - 1.0) < 1e-9
    client = client_for(world, "a_admin")
    page = client.post(
        f"/vips/{world.vip_a.pk}/listeners/{world.listener_a.pk}/backends/",
        {
            "action": "preview",
            "expected_generation": 1,
            "address": [b["address"] for b in body["backends"]],
            "port": ["8080"] * 3,
            "weight": ["1", "2", "1"],
            "host": ["web-a1", "", ""],
            "admin_state": ["active"] * 3,
        },
        HTTP_X_DASHBOARD_FETCH="1",
    )
    shown = re.search(r'class="moved-share">([\d.]+) %', page.content.decode()).group(1)
    assert shown == f"{movement['moved_share'] * 100:.2f}"
    no_preview = api.put(f"/api/listeners/{world.listener_a.pk}/backends/", body, format="json")
    assert "bucket_movement" not in no_preview.json(), "only a dry run carries the preview"


def _add_vips(world, count: int) -> None:
    operator = world.users["operator"]
    existing = Vip.objects.count()
    for i in range(count):
        vip = services.create_vip(
            tenant=world.tenant_a,
            name=f"bulk-{existing + i}",
            address=f"198.51.100.{existing + i + 1}",
            pool=world.pool_a_only,
            user=operator,
        )
        listener = services.create_listener(vip=vip, protocol="tcp", port=80, user=operator)
        services.replace_backends(
            listener,
            [{"address": "10.1.0.5", "port": 8080}, {"address": "10.1.0.6", "port": 8080}],
            user=operator,
        )


@pytest.mark.parametrize("url", ["/", "/vips/", "/audit/", "/tenants/", "/pools/", "/hosts/", "/agents/"])
def test_query_count_does_not_grow_with_the_number_of_vips(world, url):
    world.tenant_a.max_vips = 200
    world.tenant_a.save()
    client = client_for(world, "operator")
    _add_vips(world, 10)
    client.get(url)  # warm caches (sessions, content types)
    with CaptureQueriesContext(connection) as small:
        assert client.get(url).status_code == 200
    _add_vips(world, 90)
    with CaptureQueriesContext(connection) as large:
        assert client.get(url).status_code == 200
    assert len(large) == len(small), f"{url}: {len(small)} queries with 10 VIPs, {len(large)} with 100"


def test_vip_page_query_count_does_not_grow_with_backends_or_generations(world):
    client = client_for(world, "operator")
    url = f"/vips/{world.vip_a.pk}/"
    client.get(url)
    with CaptureQueriesContext(connection) as small:
        client.get(url)
    operator = world.users["operator"]
    for generation in range(6):
        services.replace_backends(
            world.listener_a,
            [{"address": f"10.1.1.{i}", "port": 8080, "weight": 1 + generation} for i in range(1, 30)],
            user=operator,
        )
    services.create_listener(vip=world.vip_a, protocol="tcp", port=443, user=operator)
    with CaptureQueriesContext(connection) as large:
        client.get(url)
    assert len(large) == len(small)


def test_audit_log_and_vip_list_filters(world):
    client = client_for(world, "operator")
    services.replace_backends(
        world.listener_b, [{"address": "10.2.0.9", "port": 8443}], user=world.users["b_member"]
    )
    by_actor = client.get("/audit/", {"actor": "b_member"}).content.decode()
    assert by_actor.count('class="audit-row"') == 1
    assert "10.2.0.9" in by_actor
    by_action = client.get(
        "/audit/", {"action": "create", "object_type": "loadbalancing.vip"}
    ).content.decode()
    assert by_action.count('class="audit-row"') == 2
    bad_time = client.get("/audit/", {"time_after": "yesterday"})
    assert bad_time.status_code == 200
    assert "Filter not understood: time_after" in bad_time.content.decode()
    vips = client.get("/vips/", {"tenant": world.tenant_b.pk}).content.decode()
    assert world.vip_b.address in vips
    assert world.vip_a.address not in vips


def test_job_stage_bars_show_only_measured_progress():
    from frontend.views.p2v import stage_bars
    from p2v.conversion.models import ConversionJob

    copying = ConversionJob(stage="copy", state="running", percent=42.0)
    bars = {b["stage"]: b for b in stage_bars(copying)}
    assert bars["plan"]["percent"] == 100.0
    assert bars["copy"]["percent"] == 42.0
    assert bars["build"]["percent"] == 0.0
    building = ConversionJob(stage="build", state="running", percent=0.0)
    building_bars = {b["stage"]: b for b in stage_bars(building)}
    assert building_bars["build"]["percent"] is None, "no measure: indeterminate"
    done = ConversionJob(stage="done", state="succeeded", percent=100.0)
    assert all(b["percent"] == 100.0 for b in stage_bars(done))
