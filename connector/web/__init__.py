"""The HTTP edge: the aiohttp app, its routes and the settings page; the only package that
knows aiohttp's server side."""
