"""Logging filters for the push path (no Django imports: settings.LOGGING loads this early)."""

from __future__ import annotations

import logging


class ChannelOverflowAsWarning(logging.Filter):
    """channels_redis reports a group_send that found channels full ("N of M channels over
    capacity in group G": those channels lost the message) at INFO. A dropped agent notification
    matters (the agent consumers repair it with a resync, see consumers._watch), so it is raised
    to WARNING where operators look."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "over capacity" in str(record.msg) and record.levelno < logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True
