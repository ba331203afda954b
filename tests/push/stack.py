"""Real processes for the push integration tests: the portal under uvicorn (Redis channel layer,
the test database) and lbagent agent processes talking to it over websockets. Every process is
started in its own session and stopped by PID, even when a test fails."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.services import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0  # uvicorn importing Django on a loaded 2-core machine: generous, not what we test


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen | None, timeout_s: float = 10.0) -> None:
    """Stop a process we started in its own session, and whatever it forked (uvicorn --workers N
    spawns workers that outlive a killed parent and keep the test database open): the group's id
    is our child's PID, so nothing of anyone else's is signalled."""
    if process is None:
        return
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):  # the group is already empty
        os.killpg(process.pid, signal.SIGKILL)


@dataclass
class PortalServer:
    """uvicorn serving datacenter.asgi on a free port of `host` (loopback unless told)."""

    env: dict[str, str]
    workdir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    starts: int = 0
    host: str = "127.0.0.1"
    workers: int = 1  # uvicorn --workers: processes sharing the port (the production layout uses 2)

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws/agents/"

    @property
    def logfile(self) -> Path:
        return self.workdir / "portal.log"

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def start(self) -> None:
        self.starts += 1
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            "datacenter.asgi:application",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--ws",
            "websockets-sansio",
            "--lifespan",
            "off",
            "--no-access-log",
            "--log-level",
            "info",
            *(("--workers", str(self.workers)) if self.workers > 1 else ()),
        ]
        with self.logfile.open("a") as log:
            log.write(f"\n=== portal start {self.starts} ===\n")
            log.flush()
            self.process = subprocess.Popen(
                argv,
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_until(self._accepts, timeout_s=START_TIMEOUT_S, what="the portal to accept connections",
                       detail=lambda: self.log()[-3000:])
        except BaseException:
            self.stop()
            raise

    def _accepts(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"portal exited ({self.process.returncode}): {self.log()[-3000:]}")
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        _stop(self.process)


@dataclass
class AgentProcess:
    """`python -m lbagent.portal` (the agent's portal client with the in-process table driver)."""

    name: str
    token: str
    portal: PortalServer
    workdir: Path
    extra_args: tuple[str, ...] = ()
    write_applied_file: bool = True
    process: subprocess.Popen | None = None
    url: str | None = None  # connect here instead of the portal (a proxy in front of it)

    @property
    def token_file(self) -> Path:
        return self.workdir / f"{self.name}.token"

    @property
    def applied_file(self) -> Path:
        return self.workdir / f"{self.name}.applied.json"

    @property
    def cache_file(self) -> Path:
        return self.workdir / f"{self.name}.cache.json"

    @property
    def logfile(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def start(self) -> None:
        self.token_file.write_text(self.token)
        self.token_file.chmod(0o600)
        argv = [
            sys.executable,
            "-m",
            "lbagent.portal",
            "--portal",
            self.url or self.portal.ws_url,
            "--token-file",
            str(self.token_file),
            "--node",
            self.name,
            *(("--applied-file", str(self.applied_file)) if self.write_applied_file else ()),
            "--state-cache",
            str(self.workdir / f"{self.name}.cache.json"),
            "--stats-interval",
            "1",
            *self.extra_args,
        ]
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env["PYTHONPATH"] = str(REPO_ROOT)
        with self.logfile.open("a") as log:
            self.process = subprocess.Popen(
                argv,
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        _stop(self.process)

    def applied(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.applied_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def listener(self, listener_id: int) -> dict[str, Any] | None:
        state = self.applied()
        if state is None:
            return None
        for vip in state["vips"]:
            for listener in vip["listeners"]:
                if listener["id"] == listener_id:
                    return listener
        return None


def seed_layout(listeners_per_vip: int = 3, agents: tuple[str, ...] = ("mux-a", "mux-b")) -> dict[str, Any]:
    """Inside a configured Django (any database): the two-tenant world, more listeners on tenant
    A's VIP, the agents, and a small Maglev table (the table driver's build cost is not what the
    push tests measure). Returns what a test needs: API keys, agent tokens, listener ids."""
    from django.test import override_settings

    from datacenter.loadbalancing import services
    from datacenter.loadbalancing.desired_state import push_settings
    from datacenter.loadbalancing.models import Listener
    from datacenter.testing import build_world, new_agent

    with override_settings(PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"]):
        world = build_world()
    cluster = push_settings()
    cluster.table_size = 4093
    cluster.save()
    operator = world.users["operator"]
    for port in range(8001, 8001 + listeners_per_vip - 1):
        listener = services.create_listener(vip=world.vip_a, protocol="tcp", port=port, user=operator)
        services.replace_backends(listener, [{"address": "10.1.0.7", "port": port}], user=operator)
    tokens = {}
    for index, name in enumerate(agents):
        _, tokens[name] = new_agent(name, world.host_shared, f"10.0.0.{2 + index}")
    # A host agent (never counted for ACTIVE) that tests may drive by hand over a raw websocket.
    _, host_token = new_agent("host-1", world.host_shared, None, role="host")
    return {
        "keys": world.keys,
        "tokens": tokens,
        "host_token": host_token,
        "listeners_a": sorted(Listener.objects.filter(vip=world.vip_a).values_list("pk", flat=True)),
        "listener_b": world.listener_b.pk,
    }


SQLITE_CACHE_DIR = Path("/var/cache/datacenter-tests")  # beside the chaos suite's PostgreSQL cache


def _django_child(path: Path, code: str) -> str:
    """Run `code` in a child process whose Django uses the SQLite database at `path` (this one's
    Django is bound to the test database); returns its output."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("REDIS_URL",) and not k.lower().endswith("_proxy")
    }
    env.update({"DATABASE_URL": f"sqlite:///{path}", "DJANGO_SETTINGS_MODULE": "datacenter.settings"})
    env["PYTHONPATH"] = str(REPO_ROOT)
    done = subprocess.run(
        [sys.executable, "-c", "import django; django.setup();" + code],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"Django on {path} failed: {done.stderr[-3000:]}")
    return done.stdout


def _migrated_sqlite() -> Path:
    """An empty, migrated SQLite database, built once per set of migrations and kept (migrating
    one from nothing takes half a minute on a loaded machine; a copy takes milliseconds)."""
    from tests.services import migrations_digest

    writable = os.access(SQLITE_CACHE_DIR.parent, os.W_OK)
    directory = SQLITE_CACHE_DIR if writable else Path(tempfile.gettempdir())
    directory.mkdir(parents=True, exist_ok=True)
    template = directory / f"push-sqlite-{migrations_digest().hexdigest()[:16]}.sqlite3"
    if not template.exists():
        building = template.with_name(f".{template.name}.{os.getpid()}")
        try:
            _django_child(building, "from django.core.management import call_command;"
                                    "call_command('migrate', verbosity=0)")
            os.replace(building, template)  # atomic: a concurrent session sees all of it or nothing
        finally:
            building.unlink(missing_ok=True)
    return template


def seed_sqlite_layout(path: Path) -> dict[str, Any]:
    """A migrated SQLite database at `path` (a copy of the cached migrated one; `migrate` still runs
    and finds nothing to do unless the cache missed a change) seeded by seed_layout."""
    shutil.copyfile(_migrated_sqlite(), path)
    out = _django_child(
        path,
        "import json; from django.core.management import call_command; call_command('migrate', verbosity=0);"
        "from tests.push.stack import seed_layout; print(json.dumps(seed_layout()))",
    )
    return json.loads(out.strip().splitlines()[-1])


class CuttableProxy:
    """A TCP proxy on loopback between agents and the portal that can kill connections the way a
    network fault does: `cut()` drops the agent's side at once (the agent reconnects) while the
    portal's side stays open, silent, and still receives, late, the frames the agent had sent
    just before the cut (`late_s` after it): the dead connection's late acknowledgements.

    Agent -> portal bytes are forwarded `delay_s` after they arrive, so a cut always finds some
    in flight while the agent acknowledges a stream of changes."""

    def __init__(self, target_port: int, *, delay_s: float = 0.15, late_s: float = 1.0) -> None:
        import asyncio
        import threading

        self.target_port = target_port
        self.delay_s, self.late_s = delay_s, late_s
        self.port = free_port()
        self.cuts = 0
        self._loop = asyncio.new_event_loop()
        self._connections: list[dict[str, Any]] = []
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cuttable-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the proxy did not start")

    def _run(self) -> None:
        import asyncio

        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    async def _accept(self, agent_reader, agent_writer) -> None:
        import asyncio

        try:
            portal_reader, portal_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            agent_writer.close()
            return
        conn: dict[str, Any] = {"agent": agent_writer, "portal": portal_writer, "cut_at": None, "tasks": []}
        self._connections.append(conn)
        queue: asyncio.Queue = asyncio.Queue()

        async def agent_to_queue() -> None:
            while data := await agent_reader.read(65536):
                queue.put_nowait((time.monotonic(), data))
            queue.put_nowait((time.monotonic(), b""))

        async def queue_to_portal() -> None:
            while True:
                arrived, data = await queue.get()
                due = arrived + self.delay_s
                if conn["cut_at"] is not None:
                    due = max(due, conn["cut_at"] + self.late_s)
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if not data:
                    if conn["cut_at"] is None:
                        portal_writer.close()
                    return  # a cut connection's portal side stays open: dead, not closed
                portal_writer.write(data)
                await portal_writer.drain()

        async def portal_to_agent() -> None:
            while data := await portal_reader.read(65536):
                if conn["cut_at"] is not None:
                    continue  # the agent's side is gone: what the portal sends is lost
                agent_writer.write(data)
                await agent_writer.drain()
            if conn["cut_at"] is None:
                agent_writer.close()

        for work in (agent_to_queue(), queue_to_portal(), portal_to_agent()):
            conn["tasks"].append(asyncio.ensure_future(self._quietly(work)))

    @staticmethod
    async def _quietly(work) -> None:
        with contextlib.suppress(OSError):  # a peer went away (reset): the other tasks notice on their own
            await work

    def cut(self) -> int:
        """Kill every open connection as described above; returns how many."""
        import asyncio

        async def cut() -> int:
            count = 0
            for conn in self._connections:
                if conn["cut_at"] is None and not conn["agent"].is_closing():
                    conn["cut_at"] = time.monotonic()
                    conn["agent"].transport.abort()  # a reset, no close frame
                    count += 1
            self.cuts += count
            return count

        return asyncio.run_coroutine_threadsafe(cut(), self._loop).result(10)

    def close(self) -> None:
        import asyncio

        async def close() -> None:
            self._server.close()
            for conn in self._connections:
                for task in conn["tasks"]:
                    task.cancel()
                for side in ("agent", "portal"):
                    conn[side].transport.abort()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


def api_call(base_url: str, key: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One REST call with a token: (HTTP status, decoded JSON body or the error text); status 0
    when no HTTP answer came at all (refused, reset, timed out: the portal is down)."""
    request = urllib.request.Request(  # noqa: S310 (a loopback URL built by the tests)
        base_url + path,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Token {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")[:300]
    except (OSError, urllib.error.URLError) as exc:
        return 0, str(exc)


@dataclass(frozen=True)
class Put:
    listener: int
    backends: frozenset[tuple[str, int]]
    status: int  # HTTP status; 0: no HTTP answer at all (connection refused, reset, timeout)
    at: float  # time.monotonic() when the answer came
    answer: str = ""  # the error body, when status is not 200


class ChangeStream:
    """Tenant clients replacing their listeners' backends back to back (one thread per role),
    every PUT and its outcome appended in order to `puts`. `api(role, method, path, body)` makes
    the call; `listeners` maps each listener id to the role that may change it; `tag` keeps this
    stream's backend sets apart from earlier streams' (addresses 10.<tag>.x.y)."""

    def __init__(
        self,
        api: Callable[[str, str, str, Any], tuple[int, Any]],
        listeners: dict[int, str],
        *,
        tag: int,
        puts: list[Put] | None = None,
    ) -> None:
        self.api = api
        self.tag = tag
        self.puts: list[Put] = [] if puts is None else puts
        self._stop = threading.Event()
        self._lock = threading.Lock()
        by_role: dict[str, list[int]] = {}
        for listener_id, role in listeners.items():
            by_role.setdefault(role, []).append(listener_id)
        self._threads = [
            threading.Thread(target=self._run, args=(role, ids), daemon=True) for role, ids in by_role.items()
        ]

    def _run(self, role: str, listener_ids: list[int]) -> None:
        step = 0
        while not self._stop.is_set():
            listener_id = listener_ids[step % len(listener_ids)]
            step += 1
            backends = [
                {"address": f"10.{self.tag}.{step % 250}.{i + 1}", "port": 8000 + i}
                for i in range(1 + step % 3)
            ]
            status, body = self.api(
                role, "PUT", f"/api/listeners/{listener_id}/backends/", {"backends": backends}
            )
            put = Put(listener_id, frozenset((b["address"], b["port"]) for b in backends), status,
                      time.monotonic(), "" if status == 200 else str(body)[:200])
            with self._lock:
                self.puts.append(put)
            if status != 200:
                self._stop.wait(0.05)  # a client retrying a failing service does not spin

    def count(self, since: float = float("-inf"), *, ok: bool = True) -> int:
        with self._lock:
            return sum(1 for p in self.puts if p.at >= since and (p.status == 200) == ok)

    def failures(self) -> list[str]:
        with self._lock:
            return [
                f"PUT listener {p.listener}: HTTP {p.status} {p.answer}" for p in self.puts if p.status != 200
            ]

    def wait(self, condition: Callable[[], bool], what: str, timeout_s: float) -> None:
        wait_until(condition, timeout_s=timeout_s, what=what, interval_s=0.02)

    def wait_for_changes(self, count: int, timeout_s: float = 120.0) -> None:
        """Until `count` PUTs of this stream were acknowledged; any failed PUT fails the test."""
        def enough() -> bool:
            failed = self.failures()
            assert not failed, failed[:3]
            return self.count(ok=True) >= count

        wait_until(enough, timeout_s=timeout_s, what=f"{count} acknowledged changes", interval_s=0.01,
                   detail=lambda: f"{self.count(ok=True)} went through")

    def __enter__(self) -> ChangeStream:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


def unsettled_listeners(
    tables: dict[int, tuple[str, int, frozenset[tuple[str, int]] | None]], agents: dict[str, AgentProcess]
) -> list[str]:
    """What is not yet true, from `tables` (listener id -> provisioning status, current table
    number, and the backends the portal holds or None not to compare them): a listener not
    ACTIVE, an agent not running a listener's current table (or running other backends)."""
    problems = []
    for listener_id, (status, number, configured) in sorted(tables.items()):
        if status != "active":
            problems.append(f"listener {listener_id} is {status} (table {number})")
        for name, agent in agents.items():
            running = agent.listener(listener_id)
            if running is None or running["generation"] != number:
                got = None if running is None else running["generation"]
                problems.append(f"{name} runs listener {listener_id} at {got}, table is {number}")
            elif configured is not None and _backends_of(running) != configured:
                problems.append(f"{name} runs other backends than the portal holds for {listener_id}")
    return problems


def _backends_of(listener: dict[str, Any]) -> frozenset[tuple[str, int]]:
    return frozenset((b["address"], b["port"]) for b in listener["backends"])


def wait_settled(unsettled: Callable[[], list[str]], timeout_s: float, what: str,
                 log_tail: Callable[[], str]) -> float:
    """Poll `unsettled()` (what is not yet true) until it is empty; returns how long that took.
    An error reading the state (a database still starting) counts as unsettled and is reported."""
    started = time.monotonic()
    problems: list[str] = []

    def settled() -> bool:
        nonlocal problems
        try:
            problems = unsettled()
        except Exception as exc:  # reported below if it lasts
            problems = [f"cannot read the state: {type(exc).__name__}: {exc}"]
        return not problems

    wait_until(settled, timeout_s=timeout_s, what=f"{what}: everything settled", interval_s=0.05,
               detail=lambda: f"still unsettled: {problems[:6]}\nportal log tail:\n{log_tail()[-4000:]}")
    return time.monotonic() - started
