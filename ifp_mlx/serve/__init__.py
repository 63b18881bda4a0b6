"""``ifp-serve``: an OpenAI-compatible local server with per-request pruning.

- ``protocol``: the settings and request validation;
- ``engine``: the worker thread that owns the model and its FIFO queue;
- ``app``: the HTTP routes and the OpenAI response bodies;
- ``guard``: what keeps web pages and connection floods out (the threat model is there).
"""

from .app import create_app
from .engine import Engine
from .guard import run
from .protocol import BadRequest, Request, ServeConfig, parse_request

__all__ = ["BadRequest", "Engine", "Request", "ServeConfig", "create_app", "parse_request", "run"]
