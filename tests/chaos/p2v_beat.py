"""Celery beat for the chaos tests: the real schedule entry of the P2V lease watchdog (added by
p2v/conversion/apps.py, interval and queue from the environment) and nothing else, so the test
Redis does not collect the project's other periodic tasks.

    python -m tests.chaos.p2v_beat <schedule file> <log file>
"""

from __future__ import annotations

import sys

import django


def main() -> None:
    schedule_file, logfile = sys.argv[1], sys.argv[2]
    django.setup()
    from django.conf import settings

    from datacenter.celery import app

    entry = settings.CELERY_BEAT_SCHEDULE["p2v-conversion-watchdog"]
    app.conf.beat_schedule = {"p2v-conversion-watchdog": entry}
    app.Beat(schedule=schedule_file, logfile=logfile, loglevel="INFO").run()


if __name__ == "__main__":
    main()
