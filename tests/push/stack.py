"""Real processes for the push integration tests: the portal under uvicorn (Redis channel layer,
the test database) and lbagent agent processes talking to it over websockets. Every process is
started in its own session and stopped by PID, even when a test fails."""

from __future__ import annotations

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
    if process is None or process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@dataclass
class PortalServer:
    """uvicorn serving datacenter.asgi on a free port of `host` (loopback unless told)."""

    env: dict[str, str]
    workdir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    starts: int = 0
    host: str = "127.0.0.1"

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
            self.portal.ws_url,
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
