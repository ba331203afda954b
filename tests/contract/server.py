"""The portal under a real uvicorn process on a socket bound here (port 0: no free-port race),
serving the test database, stopped by its PID even when a test fails."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tests.services import database_url_for_test_db, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0


class PortalUnderUvicorn:
    def __init__(self, workdir: Path, env: dict[str, str] | None = None):
        self.workdir = workdir
        self.logfile = workdir / "uvicorn.log"
        self.extra_env = env or {}
        self.process: subprocess.Popen | None = None
        self.port = 0

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def __enter__(self) -> PortalUnderUvicorn:
        listener = socket.create_server(("127.0.0.1", 0))
        self.port = listener.getsockname()[1]
        # A small connection pool: without one every request opens a PostgreSQL connection, and the
        # machine's other test runs share the server's connection limit.
        env = {**os.environ, "DATABASE_URL": database_url_for_test_db(), "DATABASE_POOL_MAX": "4",
               "DATABASE_POOL_MIN": "1",
               "DATACENTER_EMBEDDED_WORKER": "0", "PYTHONPATH": str(REPO_ROOT), **self.extra_env}
        with self.logfile.open("w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.uvicorn_on_fd", str(listener.fileno())],
                cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, pass_fds=[listener.fileno()],
                start_new_session=True)
        listener.close()  # the child holds its own copy
        try:
            wait_until(self._answers, timeout_s=START_TIMEOUT_S, what="uvicorn to serve /healthz/",
                       interval_s=0.2, detail=lambda: f"uvicorn log tail:\n{self.log()[-3000:]}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"uvicorn exited: {self.log()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as probe:
                probe.sendall(b"GET /healthz/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                return probe.recv(12).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    def __exit__(self, *exc_info) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
