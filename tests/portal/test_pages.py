"""The server-rendered landing page, login, and the API docs served without any CDN."""

from __future__ import annotations

import re

from django.test import Client

from datacenter.testing import make_user


def test_login_then_landing_lists_tenants(db, settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    from datacenter.tenancy.models import Membership, Tenant

    user = make_user("carol", password="correct horse battery")
    Membership.objects.create(user=user, tenant=Tenant.objects.create(name="Initech", slug="initech"))
    client = Client(enforce_csrf_checks=True)
    page = client.get("/login/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.content.decode()).group(1)
    refused = client.post("/login/", {"username": "carol", "password": "wrong", "csrfmiddlewaretoken": token})
    assert b"did not match" in refused.content
    logged_in = client.post(
        "/login/",
        {"username": "carol", "password": "correct horse battery", "csrfmiddlewaretoken": token},
        follow=True,
    )
    assert logged_in.status_code == 200
    assert b"Initech" in logged_in.content
    assert b"carol" in logged_in.content


def test_login_without_csrf_token_is_refused(db):
    client = Client(enforce_csrf_checks=True)
    assert client.post("/login/", {"username": "x", "password": "y"}).status_code == 403


def test_api_docs_render_from_local_static_files(db):
    page = Client().get("/api/docs/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js" in html
    assert not re.search(r'(src|href)="https?://', html), "no CDN: every asset is served by the portal"
    schema = Client().get("/api/schema/", HTTP_ACCEPT="application/json")
    assert schema.status_code == 200
    assert "/api/listeners/{id}/backends/" in schema.json()["paths"]


def test_admin_pages_render_for_operators(world):
    from django.contrib import admin

    client = Client()
    client.force_login(world.users["operator"])
    ours = [
        m
        for m in admin.site._registry
        if m._meta.app_label in ("tenancy", "inventory", "loadbalancing", "events")
    ]
    assert len(ours) >= 12
    for model in ours:
        label = f"{model._meta.app_label}/{model._meta.model_name}"
        assert client.get(f"/admin/{label}/").status_code == 200, label
        obj = model.objects.first()
        if obj is not None:
            assert client.get(f"/admin/{label}/{obj.pk}/change/").status_code == 200, label
    tenant_client = Client()
    tenant_client.force_login(world.users["a_admin"])
    assert tenant_client.get("/admin/loadbalancing/vip/").status_code == 302, "tenants are not admin users"
