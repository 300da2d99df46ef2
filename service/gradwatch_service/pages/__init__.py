"""The built-in run pages: server-rendered HTML, a few hundred lines of canvas code of our own, no build step."""

from .routes import router

__all__ = ["router"]
