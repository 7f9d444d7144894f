"""WSGI applications the end-to-end tests serve (imported by fastfpm workers as tests.apps.NAME:app)."""
