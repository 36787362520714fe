"""Django settings for a throw-away django-helpdesk test instance.

Everything instance-specific comes from the environment:
  DH_DIR        (required) instance directory: db.sqlite3, media/, static/
  DH_SMTP_HOST  (default 127.0.0.1) outgoing SMTP host, plain SMTP, no auth
  DH_SMTP_PORT  (required) outgoing SMTP port
  DH_FROM       (default support@example.test) DEFAULT_FROM_EMAIL/SERVER_EMAIL
  DH_LOG_LEVEL  (default WARNING) level of the stderr log handler
Test use only: fixed SECRET_KEY, loopback hosts only.
"""

import os
from pathlib import Path


def _required(name):
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(f"mcsite.settings: environment variable {name} is required")
    return value


INSTANCE_DIR = Path(_required("DH_DIR")).resolve()

SECRET_KEY = "mailcanary-test-only-not-secret-6f1d2c8e9b7a4e3f"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.sites",
    "django.contrib.humanize",
    "rest_framework",
    "rest_framework.authtoken",
    "helpdesk",
]
SITE_ID = 1

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "mcsite.urls"
WSGI_APPLICATION = "mcsite.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.debug",
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# The web app (waitress threads) and `manage.py get_email` (a separate
# process) write the same SQLite file: WAL, a busy timeout and IMMEDIATE
# transactions keep them from failing with "database is locked".
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": str(INSTANCE_DIR / "db.sqlite3"),
        "OPTIONS": {
            "timeout": 30,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        },
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

AUTH_PASSWORD_VALIDATORS = []

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = str(INSTANCE_DIR / "static")
MEDIA_URL = "/media/"
MEDIA_ROOT = str(INSTANCE_DIR / "media")

LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/"

# Outgoing mail: plain SMTP to the test's MTA, no TLS, no auth.
EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
EMAIL_HOST = os.environ.get("DH_SMTP_HOST", "127.0.0.1")
EMAIL_PORT = int(_required("DH_SMTP_PORT"))
EMAIL_HOST_USER = ""
EMAIL_HOST_PASSWORD = ""
EMAIL_USE_TLS = False
EMAIL_USE_SSL = False
EMAIL_TIMEOUT = 20
DEFAULT_FROM_EMAIL = os.environ.get("DH_FROM", "support@example.test")
SERVER_EMAIL = DEFAULT_FROM_EMAIL

# django-helpdesk
HELPDESK_TEAMS_MODE_ENABLED = False  # True would need pinax-teams
HELPDESK_KB_ENABLED = True  # False breaks 2.6.1's urls.py
HELPDESK_API_ENABLED = True

REST_FRAMEWORK = {
    # Token first: its WWW-Authenticate header makes unauthenticated
    # requests answer 401 rather than 403.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.BasicAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
}

LOG_LEVEL = os.environ.get("DH_LOG_LEVEL", "WARNING").upper()
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
    },
    "handlers": {
        "stderr": {
            "class": "logging.StreamHandler",
            "stream": "ext://sys.stderr",
            "formatter": "plain",
            "level": LOG_LEVEL,
        },
    },
    "root": {"handlers": ["stderr"], "level": LOG_LEVEL},
    "loggers": {
        # Django's default config mails ADMINS and filters on DEBUG; replace it.
        "django": {"handlers": ["stderr"], "level": LOG_LEVEL, "propagate": False},
    },
}
