"""The portal's console log handler: what it cannot write is counted, never fatal.

The portal logs to stderr; the process manager (systemd, Docker, supervisord) redirects that into
a file. When that file's disk is full, every write fails with ENOSPC. Python's handler then prints
a traceback about the failure to stderr, the very stream that failed, so nobody sees anything.
This handler counts each record it could not write instead, and /metrics shows the count
(datacenter_log_write_errors_total, per web process): the operator learns that the log has gaps
while the portal keeps answering.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter

LOG_WRITE_ERRORS = Counter(
    "datacenter_log_write_errors",
    "Log records this web process could not write (full disk or closed stream under its stderr).",
    registry=None,  # registered by datacenter.metrics with its own registry
)


class CountingStreamHandler(logging.StreamHandler):
    def handleError(self, record: logging.LogRecord) -> None:
        LOG_WRITE_ERRORS.inc()
