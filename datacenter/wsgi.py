"""WSGI entry point (management tools, tests); the server runs datacenter.asgi."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "datacenter.settings")
application = get_wsgi_application()
