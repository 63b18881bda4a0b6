"""What keeps ifp-serve to its users.

Threat model: the server listens on loopback by default, so only programs on this machine
reach it, but so does every web page the user opens. A page can (a) send a "simple" cross-site
POST (``text/plain``, no preflight) and (b) rebind its own domain name to 127.0.0.1 and read
the answers. So: a request's ``Host`` must name this server (loopback names, the bound address,
``--allowed-host``), which defeats rebinding; a request that carries a browser ``Origin`` is
refused unless that origin is allowed (``--allowed-origin``, answered with CORS headers); a POST
must say ``Content-Type: application/json``, which a page cannot send without a preflight. On a
non-loopback bind an API key is what keeps the network out. Idle and slow connections are
closed (header, body and keep-alive timeouts) and open connections are capped, so a flood of
them cannot use up the process's file descriptors.
"""

import ipaddress
import json
from typing import Set

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("0.0.0.0", "::", "")


def host_name(header: str) -> str:
    """``Host`` without its port, lower case (``[::1]:8080`` → ``::1``)."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def is_loopback(host: str) -> bool:
    return host in ("localhost",) or (_is_ip(host) and ipaddress.ip_address(host).is_loopback)


class Guard:
    """ASGI middleware: Host allow-list, browser origins refused unless allowed (with CORS for
    those), JSON content type on POST. Refusals are OpenAI-style JSON errors."""

    def __init__(self, app, cfg):
        self.app = app
        self.hosts: Set[str] = {*LOOPBACK_NAMES, host_name(cfg.host)}
        self.hosts.update(host_name(h) for h in cfg.allowed_hosts)
        # A DNS-rebinding request always names the attacker's domain, never an IP literal: on
        # a bind to every interface any address of this machine may be used.
        self.any_ip = cfg.host in WILDCARD_BINDS
        self.origins: Set[str] = {o.rstrip("/") for o in cfg.allowed_origins}

    def host_ok(self, header: str) -> bool:
        name = host_name(header)
        return "*" in self.hosts or name in self.hosts or (self.any_ip and _is_ip(name))

    def origin_ok(self, origin: str) -> bool:
        return "*" in self.origins or origin.rstrip("/") in self.origins

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        origin = headers.get("origin")
        method = scope["method"]
        if not self.host_ok(headers.get("host", "")):
            return await _refuse(send, 403, "host_not_allowed", "this Host is not served here "
                                 "(ifp-serve --allowed-host NAME lets it in)")  # fmt: skip
        if origin is not None and not self.origin_ok(origin):
            return await _refuse(send, 403, "origin_not_allowed", f"requests from web pages "
                                 f"({origin}) are refused (ifp-serve --allowed-origin lets one in)")  # fmt: skip
        cors = _cors_headers(origin) if origin is not None else []
        if method == "OPTIONS":  # a preflight of an allowed origin, or a plain OPTIONS
            return await _send(send, 204, b"", cors + [(b"allow", b"GET, POST, OPTIONS")])
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if method == "POST" and ctype != "application/json":
            return await _refuse(send, 415, "unsupported_media_type",
                                 "the body must be sent as Content-Type: application/json", cors)  # fmt: skip
        if not cors:
            return await self.app(scope, receive, send)

        async def send_cors(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *cors]}
            await send(message)

        return await self.app(scope, receive, send_cors)


def _cors_headers(origin: str) -> list:
    return [
        (b"access-control-allow-origin", origin.encode("latin-1")),
        (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
        (b"access-control-allow-headers", b"authorization, content-type"),
        (b"vary", b"Origin"),
    ]


async def _refuse(send, status: int, code: str, message: str, extra=()):
    err = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    await _send(send, status, json.dumps({"error": err}).encode(), list(extra))


async def _send(send, status: int, body: bytes, headers: list) -> None:
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": head + headers})
    await send({"type": "http.response.body", "body": body})


def guarded_protocol(max_connections: int, header_timeout: float):
    """uvicorn's h11 protocol, plus what it lacks: past ``max_connections`` open connections,
    the oldest one that has not sent a request is closed (so idle sockets cannot lock the
    users out; if every one is busy, the newcomer is), and a connection that has not sent a
    whole request head within ``header_timeout`` seconds (of opening, or of its last answer)
    is closed."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11(H11Protocol):
        _timer = None
        _opened = 0.0

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._opened = self.loop.time()
            if len(self.connections) > max_connections:
                idle = [c for c in self.connections if c is not self and c._idle()]
                victim = min(idle, key=lambda c: c._opened) if idle else self
                victim.transport.close()
                if victim is self:
                    return
            self._arm()

        def _idle(self) -> bool:
            return self.conn.their_state is h11.IDLE and not self.transport.is_closing()

        def _arm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_later(header_timeout, self._no_request)

        def _no_request(self) -> None:
            if self._idle():
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            if self._timer is not None:
                self._timer.cancel()
            super().connection_lost(exc)

    return GuardedH11


def run(app, cfg, port: int) -> None:
    """Serve ``app`` with uvicorn, with the limits above."""
    import uvicorn

    config = uvicorn.Config(
        app, host=cfg.host, port=port, log_level="warning",
        http=guarded_protocol(cfg.max_connections, cfg.header_timeout),
        timeout_keep_alive=max(1, int(cfg.keep_alive)), h11_max_incomplete_event_size=64 * 1024,
    )  # fmt: skip
    uvicorn.Server(config).run()


def check_exposure(host: str, api_key) -> list:
    """Warnings for a bind that reaches past this machine."""
    if is_loopback(host_name(host)):
        return []
    out = [f"listening on {host}: every machine that can reach it can use the model"]
    if api_key is None:
        out.append("no --api-key: anyone on the network can send requests")
    return out
