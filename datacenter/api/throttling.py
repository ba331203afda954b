"""Throttling: API calls per token, and login attempts per client, both answered 429 + Retry-After.

Rates are "<count>/<s|min|hour|day>" from the environment (settings.py), high by default so the
test suite and the benchmarks never meet them; "off" disables one. Counters are fixed windows in
Redis when REDIS_URL is set, so every web process shares them (Django's local cache otherwise).

* API: each token has its own budget (DATACENTER_API_TOKEN_RATE); one noisy client cannot starve
  the others, and a session user (the dashboard) is not counted against any token.
* Login: POSTs to the login pages, counted per client address and per (address, user name)
  (DATACENTER_LOGIN_RATE), checked before the password is: a throttled guess is refused even when
  it is right, so guessing faster than the rate gains nothing.
"""

from __future__ import annotations

import logging
import math
import threading
import time

from django.conf import settings
from django.core.cache import cache
from django.http import JsonResponse
from rest_framework.throttling import BaseThrottle

from datacenter.tenancy.models import ApiToken

logger = logging.getLogger(__name__)

UNITS_S = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hour": 3600, "d": 86400, "day": 86400}


def parse_rate(rate: str | None) -> tuple[int, int] | None:
    """(count, window seconds) from "100/min"; None for "off"/empty. A bad rate names itself."""
    if rate is None or rate.strip().lower() in ("", "off", "0", "none"):
        return None
    count, _, unit = rate.strip().partition("/")
    if not count.isdigit() or unit not in UNITS_S or int(count) < 1:
        raise ValueError(f"throttle rate {rate!r}: expected '<count>/<s|min|hour|day>', e.g. '600/min'")
    return int(count), UNITS_S[unit]


class TokenRateThrottle(BaseThrottle):
    """One budget per API token (DATACENTER_API_TOKEN_RATE, read per request so it can change).

    A fixed-window counter: one Redis round trip per request (DRF's SimpleRateThrottle read and
    rewrote the token's whole list of request times, two round trips and a pickle of up to
    `count` floats). A client may send up to twice the rate across a window boundary, which is
    fine for abuse protection, the only purpose of this limit.
    """

    wait_s: float | None = None

    def allow_request(self, request, view) -> bool:
        parsed = parse_rate(getattr(settings, "DATACENTER_API_TOKEN_RATE", None))
        if parsed is None or not isinstance(request.auth, ApiToken):
            return True  # "off", or a session user / anonymous request: not a token's call
        limit, window_s = parsed
        # The hash prefix keeps keys unique even across databases sharing one Redis.
        try:
            self.wait_s = _hit(f"throttle:token:{request.auth.key_hash[:24]}", limit, window_s, time.time())
        except Exception as exc:  # any counter store's outage, e.g. Redis restarting
            # A per-token budget is fairness, not authentication: while its counters cannot be
            # read (Redis down) the API keeps answering instead of failing every call with 500.
            logger.warning("API rate limit not enforced: its counters are unavailable (%s)", exc)
            self.wait_s = None
        return self.wait_s is None

    def wait(self) -> float | None:
        return self.wait_s


_redis_lock = threading.Lock()
_redis_client = None


def _shared_redis():
    """This process's client of REDIS_URL (thread-safe, made on first use), or None without Redis."""
    global _redis_client
    if not settings.REDIS_URL:
        return None
    with _redis_lock:
        if _redis_client is None:
            import redis

            _redis_client = redis.Redis.from_url(
                settings.REDIS_URL, socket_timeout=5, socket_connect_timeout=5
            )
        return _redis_client


def _hit(key: str, limit: int, window_s: int, now: float) -> float | None:
    """Count one attempt in a fixed window; seconds to wait if over `limit`, else None."""
    window = int(now // window_s)
    cache_key = f"{key}:{window}"
    client = _shared_redis()
    if client is not None:  # INCR and EXPIRE in one round trip (Django's cache.incr takes three)
        pipe = client.pipeline(transaction=False)
        pipe.incr(f"dc-throttle:{cache_key}")
        pipe.expire(f"dc-throttle:{cache_key}", window_s + 1)
        count = pipe.execute()[0]
    elif cache.add(cache_key, 1, timeout=window_s + 1):
        count = 1
    else:
        try:
            count = cache.incr(cache_key)
        except ValueError:  # expired between add and incr
            cache.add(cache_key, 1, timeout=window_s + 1)
            count = 1
    if count <= limit:
        return None
    return (window + 1) * window_s - now


class LoginThrottleMiddleware:
    """Throttle POSTs to the login pages (LOGIN_URL and the admin's) per client address and per
    (address, user name); 429 with Retry-After before the password is checked."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if request.method == "POST" and request.path in (settings.LOGIN_URL, "/admin/login/"):
            parsed = parse_rate(getattr(settings, "DATACENTER_LOGIN_RATE", None))
            if parsed is not None:
                limit, window_s = parsed
                address = request.META.get("REMOTE_ADDR", "?")
                username = str(request.POST.get("username", ""))[:150].lower()
                now = time.time()
                waits = [
                    _hit(f"throttle:login:addr:{address}", limit * 10, window_s, now),
                    _hit(f"throttle:login:user:{address}:{username}", limit, window_s, now),
                ]
                wait_s = max((w for w in waits if w is not None), default=None)
                if wait_s is not None:
                    retry_after = max(1, math.ceil(wait_s))
                    response = JsonResponse(
                        {"detail": f"Too many login attempts; try again in {retry_after} s.",
                         "code": "throttled"}, status=429)
                    response["Retry-After"] = str(retry_after)
                    return response
        return self.get_response(request)
