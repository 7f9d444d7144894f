"""fastfpm: a FastCGI process manager for Python WSGI applications, built the way php-fpm is."""

__version__ = "0.1.0"
