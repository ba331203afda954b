"""Portal settings, all from the environment (12-factor) with safe defaults for the embedded mode.

Environment variables:
  DATABASE_URL          default sqlite:///<repo>/var/db.sqlite3 (PostgreSQL: postgres://user@host/db)
  REDIS_URL             absent: in-memory channel layer, Celery on the in-process `memory://` broker
                        present: channels-redis layer, Celery broker and result backend on Redis
  DJANGO_SECRET_KEY     absent: a key generated once into var/secret_key (mode 0600)
  DJANGO_DEBUG          "1" turns DEBUG on (off otherwise)
  DJANGO_ALLOWED_HOSTS  comma-separated, default "127.0.0.1,localhost,[::1],testserver"
  DJANGO_CSRF_TRUSTED_ORIGINS  comma-separated origins (https://portal.example.com)
  DJANGO_SECURE_COOKIES "1": session and CSRF cookies only over HTTPS
  DJANGO_SECURE_SSL_REDIRECT  "1": redirect HTTP to HTTPS (except /healthz/)
  DJANGO_SECURE_HSTS_SECONDS  HSTS max-age (default 0: off); DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS and
                        DJANGO_SECURE_HSTS_PRELOAD "1" add those directives
  DJANGO_TRUST_X_FORWARDED_PROTO  "1": the reverse proxy's X-Forwarded-Proto says whether it was HTTPS
  DATACENTER_VAR_DIR    where the embedded mode keeps its state (default <repo>/var)
  DATACENTER_EMBEDDED_WORKER  "0" disables the in-process Celery worker/beat started by asgi.py
  DATACENTER_LOG_LEVEL  default INFO
  DATACENTER_API_TOKEN_RATE  API calls per token, default "20000/min" ("off" disables; 429 + Retry-After)
  DATACENTER_METRICS_TOKEN   bearer token a Prometheus scraper presents at /metrics (operators need none)
  DATACENTER_TOKEN_GRACE_S   seconds a rotated API/agent token keeps working, default 0 (?grace_s= per call)
  DATACENTER_HTTP_CONCURRENCY  HTTP requests one web process runs at once, default 16 (the others
                             wait their turn, none is refused; 0: no limit; datacenter/api/concurrency.py)
  DATACENTER_VIP_LIST_CACHE  "0": no VIP list cache (datacenter/loadbalancing/vip_list_cache.py; default on)
  DATACENTER_SKIP_EMPTY_GROUPS  "0": events go to every channel group, joined or not (default: skip empty)
  DATACENTER_ASGI_ONE_HOP    "0": Django's own ASGI handler instead of datacenter/asgi_handler.py (default on)
  DATACENTER_LOGIN_RATE      login POSTs per client address and user name, default "30/min"
                             (ten times that per address alone)
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("DATACENTER_VAR_DIR", BASE_DIR / "var"))


def _env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def _embedded_secret_key(var_dir: Path) -> str:
    """Read the embedded mode's secret key, creating it (0600) on first use."""
    path = var_dir / "secret_key"
    if path.exists():
        return path.read_text().strip()
    var_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(50)
    # O_EXCL: two processes starting at once must not write two different keys.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(key)
    return key


SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or _embedded_secret_key(VAR_DIR)
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = _env_list("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost,[::1],testserver")
CSRF_TRUSTED_ORIGINS = _env_list("DJANGO_CSRF_TRUSTED_ORIGINS", "")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "datacenter.tenancy",
    "datacenter.inventory",
    "datacenter.loadbalancing",
    "datacenter.events",
    "p2v",
    "p2v.conversion",
    "frontend",
]

MIDDLEWARE = [
    "datacenter.metrics.RequestMetricsMiddleware",
    "datacenter.events.middleware.RequestIdMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "datacenter.api.middleware.RejectNulInQueryMiddleware",
    "datacenter.api.throttling.LoginThrottleMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Keeps the chain sync under ASGI (one thread hand-over instead of ~8 per request): see its doc.
    "datacenter.api.middleware.SyncChainEnd",
]

ROOT_URLCONF = "datacenter.urls"
WSGI_APPLICATION = "datacenter.wsgi.application"
ASGI_APPLICATION = "datacenter.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------------
DEFAULT_SQLITE_URL = f"sqlite:///{VAR_DIR / 'db.sqlite3'}"
DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL") or DEFAULT_SQLITE_URL,
        conn_max_age=int(os.environ.get("DATABASE_CONN_MAX_AGE", "60")),
        conn_health_checks=True,
    )
}
_POSTGRES = DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"
if _POSTGRES and os.environ.get("DATABASE_POOL", "1") != "0":
    # Under ASGI every request runs its sync code on a fresh thread, and Django's connections
    # are per thread: without a pool each request opened a new PostgreSQL connection (a
    # backend process fork, several ms). psycopg's pool hands a warm one over instead.
    DATABASES["default"]["CONN_MAX_AGE"] = 0  # the pool keeps them; Django must not
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = False
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": int(os.environ.get("DATABASE_POOL_MIN", "2")),
        "max_size": int(os.environ.get("DATABASE_POOL_MAX", "20")),
        "timeout": 10,
    }
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    # The embedded mode writes from the web server and the in-process worker threads at once:
    # take the write lock at BEGIN and wait for it instead of failing with "database is locked".
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    # WAL: readers (the VIP list, status polls) no longer wait for a writer's commit, and a commit
    # is one append instead of a rollback-journal rewrite; synchronous=NORMAL is safe with WAL
    # (a power cut can lose the last commits, never corrupt the file).
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(os.environ.get("DJANGO_STATIC_ROOT", BASE_DIR / "staticfiles"))
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # WhiteNoise warns on every request otherwise
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    # No manifest: templates render even before collectstatic (tests, first start).
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# Serve straight from the app directories as well, so the API docs work without collectstatic.
WHITENOISE_USE_FINDERS = True

LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/"

# --- Security ---------------------------------------------------------------------------------------
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False  # the dashboard's JavaScript reads it to send X-CSRFToken
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
if os.environ.get("DJANGO_SECURE_COOKIES") == "1":
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
# HTTPS in production (docker-compose.yml sets these; `manage.py check --deploy` is clean with them).
# TLS usually ends at a reverse proxy, which says so in X-Forwarded-Proto.
SECURE_SSL_REDIRECT = os.environ.get("DJANGO_SECURE_SSL_REDIRECT") == "1"
SECURE_REDIRECT_EXEMPT = [r"^healthz/$"]  # the container healthcheck probes plain HTTP on loopback
SECURE_HSTS_SECONDS = int(os.environ.get("DJANGO_SECURE_HSTS_SECONDS", "0"))
SECURE_HSTS_INCLUDE_SUBDOMAINS = os.environ.get("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS") == "1"
SECURE_HSTS_PRELOAD = os.environ.get("DJANGO_SECURE_HSTS_PRELOAD") == "1"
if os.environ.get("DJANGO_TRUST_X_FORWARDED_PROTO") == "1":
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

# --- Redis, Channels, Celery -----------------------------------------------------------------------
REDIS_URL = os.environ.get("REDIS_URL") or None
EMBEDDED_MODE = REDIS_URL is None

if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # redis-py 8 defaults socket_timeout to 5 s, the same as channels_redis' BZPOPMIN wait:
            # idle consumers then die every ~5 s (django/channels_redis#422). Give reads more room.
            "CONFIG": {
                "hosts": [{"address": REDIS_URL, "socket_timeout": 30}],
                # Messages a consumer's channel holds before group_send drops new ones (the agent
                # consumers detect a dropped notification and resync; tests shrink this).
                "capacity": int(os.environ.get("CHANNEL_LAYER_CAPACITY", "100")),
            },
        }
    }
    CELERY_BROKER_URL = REDIS_URL
    CELERY_RESULT_BACKEND = REDIS_URL
else:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels.layers.InMemoryChannelLayer",
            "CONFIG": {"capacity": int(os.environ.get("CHANNEL_LAYER_CAPACITY", "100"))},
        }
    }
    # One process: the broker is kombu's in-memory transport and asgi.py starts a worker thread and
    # an embedded beat on it, so jobs still run asynchronously from the request that queued them.
    CELERY_BROKER_URL = "memory://"
    CELERY_RESULT_BACKEND = "cache+memory://"

CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TIMEZONE = TIME_ZONE
CELERY_TASK_TRACK_STARTED = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# --- Agent connections (datacenter/loadbalancing/consumers.py) ------------------------------------
# How often each agent connection is checked for a dropped notification, a lagging agent and
# silence; how long an unacknowledged document may wait before it is re-sent in full; and how
# long a connection may stay silent (agents send stats every 5 s) before it is closed as dead.
LB_AGENT_WATCH_INTERVAL_S = float(os.environ.get("LB_AGENT_WATCH_INTERVAL_S", "1.0"))
LB_AGENT_ACK_LAG_S = float(os.environ.get("LB_AGENT_ACK_LAG_S", "10"))
LB_AGENT_SILENCE_TIMEOUT_S = float(os.environ.get("LB_AGENT_SILENCE_TIMEOUT_S", "30"))

# --- Retention (datacenter/events/retention.py, a periodic job) -----------------------------------
# Rows older than *_DAYS and rows beyond *_MAX (oldest first) are deleted every
# RETENTION_INTERVAL_S. Generations: each listener always keeps its newest
# RETENTION_GENERATIONS_KEEP (the current one included), whatever their age.
RETENTION = {
    "events_days": int(os.environ.get("RETENTION_EVENTS_DAYS", "30")),
    "events_max": int(os.environ.get("RETENTION_EVENTS_MAX", "200000")),
    "audit_days": int(os.environ.get("RETENTION_AUDIT_DAYS", "365")),
    "audit_max": int(os.environ.get("RETENTION_AUDIT_MAX", "1000000")),
    "generations_days": int(os.environ.get("RETENTION_GENERATIONS_DAYS", "90")),
    "generations_keep": int(os.environ.get("RETENTION_GENERATIONS_KEEP", "20")),
}
RETENTION_INTERVAL_S = float(os.environ.get("RETENTION_INTERVAL_S", "3600"))
CELERY_BEAT_SCHEDULE: dict = {
    "prune-history": {"task": "datacenter.events.prune_history", "schedule": RETENTION_INTERVAL_S},
}
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
EMBEDDED_WORKER_ENABLED = EMBEDDED_MODE and os.environ.get("DATACENTER_EMBEDDED_WORKER", "1") != "0"
EMBEDDED_WORKER_CONCURRENCY = int(os.environ.get("DATACENTER_EMBEDDED_WORKER_CONCURRENCY", "2"))

# --- Cache (throttling counters) ---------------------------------------------------------------------
# Shared by every web process through Redis when there is one, so a limit is one limit.
if REDIS_URL:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL,
                          "KEY_PREFIX": "dc-cache"}}
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# HTTP requests one web process runs at once (datacenter/api/concurrency.py). 16: below the
# database pool's 20, so requests beyond it wait in the event loop instead of for a connection
# (10 s, then an error), and the agent connections' acknowledgements always find one.
DATACENTER_HTTP_CONCURRENCY = int(os.environ.get("DATACENTER_HTTP_CONCURRENCY", "16"))

# The VIP list from a per-process cache checked against per-tenant versions that database
# triggers bump (datacenter/loadbalancing/vip_list_cache.py); "0" turns it off.
DATACENTER_VIP_LIST_CACHE = os.environ.get("DATACENTER_VIP_LIST_CACHE", "1") != "0"

# Events skip channel groups nobody joined (agent_sync._groups_with_members); "0": send to all.
DATACENTER_SKIP_EMPTY_GROUPS = os.environ.get("DATACENTER_SKIP_EMPTY_GROUPS", "1") != "0"

# High defaults: abuse protection, never a limit the suite or the benchmarks meet.
DATACENTER_API_TOKEN_RATE = os.environ.get("DATACENTER_API_TOKEN_RATE", "20000/min")
DATACENTER_LOGIN_RATE = os.environ.get("DATACENTER_LOGIN_RATE", "30/min")
# /metrics for a Prometheus scraper without an operator account: `Authorization: Bearer <this>`.
DATACENTER_METRICS_TOKEN = os.environ.get("DATACENTER_METRICS_TOKEN", "")
# How long a rotated API or agent token keeps working unless the call says (?grace_s=). 0 by
# default: a rotation without a window also serves to revoke a leaked token at once.
DATACENTER_TOKEN_GRACE_S = int(os.environ.get("DATACENTER_TOKEN_GRACE_S", "0"))

# --- REST API ---------------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "datacenter.tenancy.authentication.ApiTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["datacenter.tenancy.permissions.IsAuthenticatedWithTokenScope"],
    "DEFAULT_FILTER_BACKENDS": [
        "datacenter.api.filter_backends.StrictDjangoFilterBackend",
        "rest_framework.filters.OrderingFilter",
    ],
    "DEFAULT_PAGINATION_CLASS": "datacenter.api.pagination.LimitOffsetPagination",
    # JSON only (datacenter/api/parsers.py): what the schema can describe and clients send.
    "DEFAULT_PARSER_CLASSES": ["datacenter.api.parsers.StrictJSONParser"],
    "TEST_REQUEST_DEFAULT_FORMAT": "json",
    "PAGE_SIZE": 50,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "datacenter.api.exceptions.exception_handler",
    "DEFAULT_THROTTLE_CLASSES": ["datacenter.api.throttling.TokenRateThrottle"],
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Datacenter portal API",
    "DESCRIPTION": (
        "Tenants manage their VIPs, listeners and backends; operators manage tenants, hosts, VIP pools "
        "and agent nodes. Authenticate with `Authorization: Token <key>`."
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "SCHEMA_PATH_PREFIX": r"/api/",
    "APPEND_COMPONENTS": {
        "securitySchemes": {
            "tokenAuth": {
                "type": "apiKey",
                "in": "header",
                "name": "Authorization",
                "description": "`Token <key>` (create one at /api/tokens/ or with `manage.py seed_demo`)",
            }
        }
    },
    "SECURITY": [{"tokenAuth": []}],
    # Every error status each operation can answer, with its body (datacenter/api/schema.py).
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "datacenter.api.schema.add_error_responses",
    ],
    "ENUM_NAME_OVERRIDES": {
        "MembershipRoleEnum": "datacenter.tenancy.choices.MembershipRole",
        "AgentRoleEnum": "datacenter.loadbalancing.choices.AgentRole",
        "HostRoleEnum": "datacenter.inventory.choices.HostRole",
    },
}

# --- Logging ----------------------------------------------------------------------------------------
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    # counts what it cannot write (a full log disk) for /metrics instead of failing
    "handlers": {"console": {"class": "datacenter.log_handlers.CountingStreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("DATACENTER_LOG_LEVEL", "INFO")},
    "filters": {"channel_overflow": {"()": "datacenter.loadbalancing.log_filters.ChannelOverflowAsWarning"}},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
        "channels_redis.core": {"filters": ["channel_overflow"]},
    },
}
