"""A real S3 API on 127.0.0.1 for tests and benchmarks: moto's server mode, in a thread.

Clients reach it over HTTP through ``AWS_ENDPOINT_URL``, exactly as they would reach
MinIO or R2. ``ENV`` holds the test credentials it accepts (moto checks none, but the
clients need some, and having them in the environment keeps every client from looking
for credentials anywhere else, such as an instance metadata address).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager

#: Test-only credentials; a test checks that the secret never shows up in logs.
ACCESS_KEY_ID = "AKIAIMAGESTREAMTEST"
SECRET_ACCESS_KEY = "imagestream-test-secret-Q2hhbmdlTWU"  # noqa: S105 (moto checks none)


def environment(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running() -> Iterator[str]:
    """A moto S3 server on a free loopback port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    # moto's werkzeug server logs every request at INFO.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
