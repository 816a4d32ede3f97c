"""openelm_rt.serve: an OpenAI-compatible HTTP server on the continuous-batching engine.

    openelm-rt serve MODEL.oelm [--host 127.0.0.1] [--port 8080] [--api-key KEY] ...

Needs the optional extra `pip install "openelm_rt[serve]"` (FastAPI, uvicorn, prometheus_client).
`create_app` builds the ASGI app (for embedding or tests); `main` runs it under uvicorn;
`openelm_rt.serve.ray` deploys it on Ray Serve (extra `[ray]`).
"""
from __future__ import annotations

import ipaddress
import sys

_MISSING = None
try:
    from .app import ServeOptions, create_app  # noqa: F401
except ImportError as e:  # FastAPI / uvicorn / prometheus_client not installed
    _MISSING = e

__all__ = ["ServeOptions", "create_app", "run", "wait_ready"]


def _require():
    if _MISSING is not None:
        raise ImportError(f"the server needs the optional dependencies: pip install \"openelm_rt[serve]\" "
                          f"({_MISSING})") from _MISSING


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def wait_ready(base_url: str, timeout: float = 60.0, process=None) -> None:
    """Waits until the server at base_url answers GET /health with 200 (the model is loaded).
    Raises TimeoutError after `timeout` seconds, RuntimeError if `process` (a Popen) exits."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(base_url.rstrip("/") + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass  # not listening yet, or 503 while loading
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base_url} was not ready within {timeout} s")
        time.sleep(0.05)


def run(options, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info"):
    """Serves `options.model` on host:port until interrupted (uvicorn; uvloop and httptools when present)."""
    _require()
    import uvicorn

    if not _is_loopback(host) and not options.api_key:
        print(f"openelm-rt serve: warning: listening on {host} without --api-key; anyone who can reach "
              f"this port can use the model", file=sys.stderr)
    app = create_app(options)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
