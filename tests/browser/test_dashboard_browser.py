"""The dashboard in a real browser: Debian's Chromium driven by Playwright against the portal
running under uvicorn (Redis channel layer, the test database), as an operator and as tenant users.

Every page: content, no console error, no request to any host but the portal, no serious or
critical axe-core violation, a 1280x800 screenshot in var/screenshots/. Live updates: a REST
change by another client appears on an open VIP page without reload; a dropped socket reconnects
and catches up from the event cursor. The backend editor's preview and apply, a 409 on a stale
edit, drain with confirmation, approving a P2V event, and tenant isolation.

Bounds here are generous on purpose (a shared 2-core machine): how fast a change reaches the
screen is measured in bench/dashboard.py, not asserted here.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.environment import need
from tests.services import database_url_for_test_db, redis_answers

# django_db: makes pytest-django create the test database; the rows the portal process reads are
# committed by the module fixture, and the tests themselves change data only through the portal.
pytestmark = [pytest.mark.browser, pytest.mark.django_db]

CHROMIUM = "/usr/bin/chromium"
AXE = Path(__file__).parent / "vendor" / "axe.min.js"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "var" / "screenshots"
VIEWPORT = {"width": 1280, "height": 800}
PASSWORD = "correct horse battery staple"
UI_TIMEOUT_MS = 30_000  # generous: the machine is shared; speed is the benchmark's business
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-sync",
    "--no-first-run",
    "--disable-domain-reliability",
    "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
]


@dataclass
class Dashboard:
    portal: Any
    world: Any
    p2v: dict[str, int]
    browser: Any
    foreign_requests: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.portal.http_url

    def api(self, role: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 - a loopback URL built here
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"Token {self.world.keys[role]}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def new_page(self, *, strict: bool = True):
        """A fresh browser context; every request to another host is aborted and recorded, and
        (when `strict`) console errors are collected for the test to assert on."""
        context = self.browser.new_context(viewport=VIEWPORT)
        context.set_default_timeout(UI_TIMEOUT_MS)
        portal = urlsplit(self.url).netloc

        def guard(route) -> None:
            if urlsplit(route.request.url).netloc == portal:
                route.continue_()
            else:
                self.foreign_requests.append(route.request.url)
                route.abort()

        context.route("**/*", guard)
        page = context.new_page()
        page.console_errors = []
        if strict:
            page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
            page.on("pageerror", lambda e: page.console_errors.append(str(e)))
        page.on(
            "websocket",
            lambda ws: urlsplit(ws.url).netloc != portal and self.foreign_requests.append(ws.url),
        )
        return page

    def login(self, page, username: str) -> None:
        page.goto(self.url + "/login/")
        page.get_by_label("Username").fill(username)
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Log in").click()
        page.wait_for_url(self.url + "/")


def wait_connected(page) -> None:
    page.wait_for_function("window.dashboard && window.dashboard.connected")


def axe_violations(page) -> list[str]:
    page.add_script_tag(path=str(AXE))
    result = page.evaluate("async () => await axe.run(document, {resultTypes: ['violations']})")
    return [
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:3]}"
        for v in result["violations"]
        if v["impact"] in ("serious", "critical")
    ]


def check_page(page, name: str) -> None:
    """No console error, no serious/critical axe violation; a screenshot for the README and review."""
    assert page.console_errors == [], f"{name}: console errors {page.console_errors}"
    violations = axe_violations(page)
    assert violations == [], f"{name}: accessibility violations:\n" + "\n".join(violations)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=False)


_TEST_CONNECTIONS: list = []


@pytest.fixture(autouse=True)
def _remember_test_connection(_django_db_helper):
    """The connection each test's transaction used: with Playwright's event loop running, Django
    keeps it apart from the module fixture's, so the module closes these itself at the end
    (otherwise the test database cannot be dropped: "being accessed by other users")."""
    from django.db import connections

    _TEST_CONNECTIONS.append(connections["default"])
    return


def _p2v_objects(world) -> dict[str, int]:
    from django.utils import timezone

    from p2v.conversion.models import Hypervisor
    from p2v.models import Assessment, ConversionEvent, Machine

    machine = Machine.objects.create(name="db-legacy-1", address="192.0.2.40")
    facts = {
        "schema": 1,
        "cpu": {"model": "Xeon E5-2620", "sockets": 1, "cores_per_socket": 6, "threads_per_core": 2},
        "memory_bytes": 16 * 2**30,
        "firmware": {"type": "bios"},
        "os": {"id": "debian", "version_id": "12", "pretty_name": "Debian GNU/Linux 12"},
        "disks": [{"name": "sda", "size_bytes": 2 * 10**11, "model": "ST2000"}],
        "nics": [{"name": "eth0", "mac": "52:54:00:12:34:56"}],
    }
    assessment = Assessment.objects.create(
        machine=machine,
        status="succeeded",
        trigger="manual",
        facts=facts,
        facts_schema=1,
        compatibility_score=92,
        compatible=True,
        blockers=[],
        warnings=[{"rule": "nic-rename", "message": "eth0 will be a virtio NIC"}],
        started=timezone.now(),
        finished=timezone.now(),
        duration_s=4.2,
    )
    Hypervisor.objects.create(name="hv-test", uri="test:///default", storage_pool="default")
    event = ConversionEvent.objects.create(
        machine=machine,
        kind="health",
        status="pending-approval",
        raised_by=f"health: assessment #{assessment.pk}",
        assessment=assessment,
        details={"signals": ["disk sda: reallocated sectors 12 -> 40"]},
    )
    return {"machine": machine.pk, "event": event.pk}


@pytest.fixture(scope="module")
def dashboard(django_db_setup, django_db_blocker, tmp_path_factory):
    need(
        shutil.which(CHROMIUM) is not None or os.path.exists(CHROMIUM), f"needs {CHROMIUM} (Debian chromium)"
    )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need(False, "needs the playwright Python package (requirements-dev.txt)")
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection, connections
    from django.test import override_settings

    need(redis_answers(getattr(settings, "REDIS_URL", None)), "needs Redis (REDIS_URL; `make services`)")
    need(connection.vendor == "postgresql", "needs PostgreSQL shared with the portal process")
    from datacenter.loadbalancing.desired_state import push_settings
    from datacenter.testing import build_world, new_agent
    from tests.push.stack import AgentProcess, PortalServer

    workdir = tmp_path_factory.mktemp("dashboard")
    portal = None
    agents: dict[str, Any] = {}
    with django_db_blocker.unblock():
        try:
            with override_settings(PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"]):
                world = build_world()
            for role in ("operator", "a_admin", "a_viewer"):
                user = world.users[role]
                user.set_password(PASSWORD)  # the production hasher: the portal process checks it
                user.save()
            cluster = push_settings()
            cluster.table_size = 4093  # small prime: table builds are not what these tests look at
            cluster.save()
            tokens = {}
            for name, address in (("mux-a", "10.0.0.2"), ("mux-b", "10.0.0.3")):
                _, tokens[name] = new_agent(name, world.host_shared, address)
            p2v = _p2v_objects(world)
            env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
            env.update(
                {
                    "DATABASE_URL": database_url_for_test_db(),
                    "REDIS_URL": settings.REDIS_URL,
                    "DJANGO_SECRET_KEY": settings.SECRET_KEY,
                    "DATACENTER_EMBEDDED_WORKER": "0",
                    "PYTHONPATH": str(settings.BASE_DIR),
                }
            )
            portal = PortalServer(env=env, workdir=workdir)
            portal.start()
            for name, token in tokens.items():
                agents[name] = AgentProcess(name, token, portal, workdir)
                agents[name].start()
            # Playwright's sync API runs an event loop in this thread; Django would refuse the
            # per-test transaction (django_db) then. The tests touch the ORM only there.
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
                )
                try:
                    yield Dashboard(portal=portal, world=world, p2v=p2v, browser=browser)
                finally:
                    browser.close()
        finally:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
            for agent in agents.values():
                agent.stop()
            if portal is not None:
                portal.stop()
            call_command("flush", interactive=False, verbosity=0)
            for test_connection in _TEST_CONNECTIONS:
                test_connection.close()
            connections.close_all()  # give the pooled connections back before the test database is dropped
            connection.close_pool()


def test_operator_sees_every_page_accessible_and_local(dashboard):
    world = dashboard.world
    page = dashboard.new_page()
    dashboard.login(page, "operator")
    page.wait_for_selector("#overview-cards")
    wait_connected(page)
    assert page.locator("#h-agents").is_visible()
    # the agents applied the world's listeners: the overview counts them active
    page.wait_for_function("() => (document.querySelector('#agents-online') || {}).textContent === '2'")
    check_page(page, "overview")
    vip_a = world.vip_a.pk
    pages = [
        ("vips", "/vips/", "203.0.113.10"),
        ("vip", f"/vips/{vip_a}/", "Bucket share per backend"),
        ("agents", "/agents/", "mux-a"),
        ("hosts", "/hosts/", "web-a1"),
        ("host", f"/hosts/{world.host_a.pk}/", "Backends on this host"),
        ("tenants", "/tenants/", "Globex"),
        ("tenant", f"/tenants/{world.tenant_a.pk}/", "a_admin"),
        ("pools", "/pools/", "203.0.113.0/24"),
        ("pool", f"/pools/{world.pool.pk}/", "VIPs in this pool"),
        ("p2v-machines", "/p2v/machines/", "db-legacy-1"),
        ("p2v-machine", f"/p2v/machines/{dashboard.p2v['machine']}/", "Xeon E5-2620"),
        ("p2v-events", "/p2v/events/", "reallocated sectors"),
        ("p2v-jobs", "/p2v/jobs/", "No conversion jobs"),
        ("audit", "/audit/", "replace_backends"),
    ]
    for name, path, text in pages:
        page.goto(dashboard.url + path)
        shown = page.get_by_text(text, exact=False).filter(visible=True)
        assert shown.count() > 0, f"{name}: {text!r} not shown"
        wait_connected(page)
        check_page(page, name)
    # times are shown in the browser's zone, with the ISO time on hover
    first_time = page.locator("time[datetime]").first
    assert first_time.get_attribute("title") == first_time.get_attribute("datetime")
    assert "UTC" not in first_time.inner_text() or page.evaluate(
        "Intl.DateTimeFormat().resolvedOptions().timeZone"
    ) in ("UTC", "Etc/UTC")
    # keyboard: the first Tab reaches "Skip to content", which moves focus past the navigation
    page.goto(dashboard.url + f"/vips/{vip_a}/")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    page.keyboard.press("Enter")
    assert page.evaluate("location.hash") == "#main"
    # a narrow window still works: the navigation wraps, the VIP table scrolls
    page.set_viewport_size({"width": 420, "height": 800})
    page.goto(dashboard.url + f"/vips/{vip_a}/")
    assert page.get_by_role("link", name="Audit log").is_visible()
    assert dashboard.foreign_requests == [], f"requests to other hosts: {dashboard.foreign_requests}"


def test_rest_change_appears_live_and_a_dropped_socket_catches_up(dashboard):
    world = dashboard.world
    page = dashboard.new_page()
    dashboard.login(page, "operator")
    page.goto(dashboard.url + f"/vips/{world.vip_b.pk}/")
    wait_connected(page)
    backends = [{"address": "10.2.0.5", "port": 8443}, {"address": "10.2.0.6", "port": 8443}]
    code, body = dashboard.api(
        "b_member", "PUT", f"/api/listeners/{world.listener_b.pk}/backends/", {"backends": backends}
    )
    assert code == 200, body
    changed = time.monotonic()
    row = page.locator('tr.backend-row[data-backend="10.2.0.6:8443"]')
    row.wait_for()  # no reload: the page's websocket brought it
    seen_after_s = time.monotonic() - changed
    print(f"REST change on screen after {seen_after_s:.2f} s (not asserted; bench/dashboard.py measures it)")

    page.evaluate("window.dashboard.pause()")
    page.wait_for_function("!window.dashboard.connected && window.dashboard.idle")
    refreshes = page.evaluate("window.dashboard.refreshes")
    cursor_before = page.evaluate("window.dashboard.cursor")
    missed = [*backends, {"address": "10.2.0.7", "port": 8443}]
    code, body = dashboard.api(
        "b_member", "PUT", f"/api/listeners/{world.listener_b.pk}/backends/", {"backends": missed}
    )
    assert code == 200, body
    code, feed = dashboard.api("operator", "GET", f"/api/events/?since={cursor_before}")
    assert code == 200
    newest = feed["next_since"]
    assert newest > cursor_before, "the change wrote an event the page has not seen"
    assert page.locator('tr.backend-row[data-backend="10.2.0.7:8443"]').count() == 0, (
        "paused: nothing arrived"
    )
    assert page.evaluate("window.dashboard.refreshes") == refreshes

    page.evaluate("window.dashboard.resume()")
    page.locator('tr.backend-row[data-backend="10.2.0.7:8443"]').wait_for()
    page.wait_for_function(f"window.dashboard.cursor >= {newest}")
    assert page.console_errors == []


def test_backend_editor_preview_apply_conflict_and_drain(dashboard):
    world = dashboard.world
    page = dashboard.new_page()
    dashboard.login(page, "a_admin")
    page.goto(dashboard.url + f"/vips/{world.vip_a.pk}/")
    wait_connected(page)
    listener = world.listener_a.pk
    editor = page.locator(f"#listener-{listener} form.backend-editor")
    rows = editor.locator("tr.editor-row")
    filled = page.evaluate(f"document.querySelectorAll('#listener-{listener} tr.editor-row').length")
    editor.get_by_role("button", name="Add a row").click()
    assert rows.count() == filled + 1
    blank = filled  # the first blank row after the existing backends (1-based label numbers)
    editor.get_by_label(f"Address of row {blank}", exact=True).fill("10.1.0.20")
    editor.get_by_label(f"Port of row {blank}", exact=True).fill("8080")
    editor.get_by_label(f"Weight of row {blank}", exact=True).fill("3")
    editor.get_by_role("button", name="Preview").click()
    result = editor.locator(".editor-result")
    result.locator(".result").wait_for()
    assert "Buckets moving to another backend" in result.inner_text(), result.inner_text()
    moved = float(result.locator(".moved-share").inner_text().split()[0])
    assert 30 < moved < 70, f"adding weight 3 to weights 1+2 moves about half the buckets, not {moved} %"
    assert "10.1.0.20:8080" in result.inner_text()
    check_page(page, "vip-editor-preview")

    # someone else changes the list meanwhile: this edit is stale, applying it must not overwrite
    code, state = dashboard.api("a_member", "GET", f"/api/listeners/{listener}/backends/")
    assert code == 200
    other = [*state["backends"], {"address": "10.1.0.30", "port": 8080}]
    code, body = dashboard.api("a_member", "PUT", f"/api/listeners/{listener}/backends/", {"backends": other})
    assert code == 200, body
    editor.get_by_role("button", name="Apply").click()
    result.get_by_text("Conflict (409)").wait_for()
    # Chromium logs every 4xx answer to fetch(); this one is the expected conflict, nothing else
    assert page.console_errors == [
        "Failed to load resource: the server responded with a status of 409 (Conflict)"
    ]
    page.console_errors.clear()
    code, after = dashboard.api("a_member", "GET", f"/api/listeners/{listener}/backends/")
    assert [b["address"] for b in after["backends"]] == [b["address"] for b in other], "nothing overwritten"

    # reload, redo the edit on the current list, apply
    page.goto(dashboard.url + f"/vips/{world.vip_a.pk}/")
    wait_connected(page)
    editor = page.locator(f"#listener-{listener} form.backend-editor")
    filled = len(after["backends"]) + 1
    editor.get_by_label(f"Address of row {filled}", exact=True).fill("10.1.0.20")
    editor.get_by_label(f"Port of row {filled}", exact=True).fill("8080")
    editor.get_by_role("button", name="Apply").click()
    editor.locator(".editor-result").get_by_text("Applied: generation").wait_for()
    page.locator('tr.backend-row[data-backend="10.1.0.20:8080"]').wait_for()

    # drain with a confirmation step
    page.get_by_role("link", name="Drain 10.1.0.6:8080").click()
    page.get_by_role("heading", name="Drain backend 10.1.0.6:8080?").wait_for()
    check_page(page, "backend-drain-confirm")
    page.get_by_role("button", name="Yes, drain it").click()
    page.get_by_text("Change saved as generation").wait_for()
    state_cell = page.locator('tr.backend-row[data-backend="10.1.0.6:8080"] .admin-state')
    assert state_cell.inner_text().strip() == "draining"
    assert page.console_errors == []


def test_operator_approves_a_p2v_event(dashboard):
    page = dashboard.new_page()
    dashboard.login(page, "operator")
    page.goto(dashboard.url + "/p2v/events/")
    event = dashboard.p2v["event"]
    page.get_by_label(f"Note for event {event}").fill("disk is failing, convert tonight")
    page.get_by_role("button", name=f"Approve #{event}").click()
    page.get_by_text(f"Event #{event} approved").wait_for()
    assert page.locator(f'tr.waiting-event[data-event="{event}"]').count() == 0
    code, body = dashboard.api("operator", "GET", f"/api/p2v/events/{event}/")
    assert code == 200
    assert body["status"] == "started", body
    page.goto(dashboard.url + "/p2v/jobs/")
    page.get_by_role("link", name="#", exact=False).first.click()
    page.get_by_role("heading", name="Log").wait_for()
    assert page.locator("progress").count() == 5, "one bar per stage"
    assert "queued on hypervisor hv-test" in page.locator("#job-log").inner_text()
    wait_connected(page)
    # a log line the job writes streams onto the open page (the job's channel group)
    from p2v.conversion import services as conversion
    from p2v.conversion.models import ConversionJob

    job = ConversionJob.objects.get(pk=int(page.url.rstrip("/").rsplit("/", 1)[1]))

    def write_log_line() -> None:  # as a worker would: its own thread (this one runs Playwright's loop)
        from django.db import connections

        try:
            conversion.log(job, "copy: 128 MiB of 256 MiB verified")
        finally:
            connections.close_all()

    writer = threading.Thread(target=write_log_line)
    writer.start()
    writer.join()
    page.locator("#job-log").get_by_text("copy: 128 MiB of 256 MiB verified").wait_for()
    check_page(page, "p2v-job")


def test_tenant_user_cannot_see_another_tenant_or_operator_pages(dashboard):
    world = dashboard.world
    page = dashboard.new_page(strict=False)  # 403/404 pages log "failed to load" on purpose
    dashboard.login(page, "a_admin")
    assert page.get_by_role("link", name="Agents").count() == 0
    assert page.get_by_role("link", name="P2V jobs").count() == 0
    listing = page.goto(dashboard.url + "/vips/")
    assert listing.status == 200
    assert page.get_by_text("203.0.113.10").count() == 1
    assert page.get_by_text("203.0.113.20").count() == 0
    assert page.goto(dashboard.url + f"/vips/{world.vip_b.pk}/").status == 404
    for path in ("/agents/", "/p2v/machines/", "/p2v/events/", "/p2v/jobs/"):
        assert page.goto(dashboard.url + path).status == 403, path
    viewer = dashboard.new_page()
    dashboard.login(viewer, "a_viewer")
    for name, path, text in [
        ("tenant-overview", "/", "Your tenants"),
        ("tenant-vips", "/vips/", "203.0.113.10"),
        ("tenant-hosts", "/hosts/", "web-a1"),
        ("tenant-tenants", "/tenants/", "Acme"),
        ("tenant-pools", "/pools/", "private-a"),
        ("tenant-audit", "/audit/", "203.0.113.10"),
    ]:
        viewer.goto(dashboard.url + path)
        assert viewer.get_by_text(text, exact=False).filter(visible=True).count() > 0, f"{name}: {text!r}"
        assert viewer.get_by_text("Globex").count() == 0, f"{name}: another tenant's name shown"
        wait_connected(viewer)
        check_page(viewer, name)
    viewer.goto(dashboard.url + f"/vips/{world.vip_a.pk}/")
    assert viewer.locator("form.backend-editor").count() == 0
    assert viewer.get_by_role("link", name="Drain", exact=False).count() == 0
    check_page(viewer, "vip-viewer")
