"""Real processes for the push integration tests: the portal under uvicorn (Redis channel layer,
the test database) and lbagent agent processes talking to it over websockets. Every process is
started in its own session and stopped by PID, even when a test fails."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 30.0


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
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"portal did not start: {self.log()[-3000:]}") from None
                time.sleep(0.1)

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


def seed_sqlite_layout(path: Path) -> dict[str, Any]:
    """A migrated SQLite database at `path` seeded by seed_layout, built in a child process (this
    one's Django is bound to the test database)."""
    code = (
        "import json, django; django.setup();"
        "from django.core.management import call_command; call_command('migrate', verbosity=0);"
        "from tests.push.stack import seed_layout; print(json.dumps(seed_layout()))"
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("REDIS_URL",) and not k.lower().endswith("_proxy")
    }
    env.update({"DATABASE_URL": f"sqlite:///{path}", "DJANGO_SETTINGS_MODULE": "datacenter.settings"})
    env["PYTHONPATH"] = str(REPO_ROOT)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    if done.returncode != 0:
        raise RuntimeError(f"seeding {path} failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


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
