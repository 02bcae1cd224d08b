"""The OpenAPI document is true: schemathesis sends generated requests to every documented
operation of a running api process and checks that no answer is a 5xx and that every
answer (status, content type, headers, body) matches the document; and every route of the
app is documented, and nothing else is."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from imagestream.api import openapi
from imagestream.api.app import create_app
from imagestream.api.auth import ROUTE_ROLES
from imagestream.api.settings import ApiSettings
from imagestream.common import tokens
from imagestream.common.connections import Resources, redis_client
from imagestream.common.keys import Keys

from .helpers import wait_ready
from .procs import Fleet, free_port, service_env

OPERATIONS_OUTSIDE_V1 = ("/healthz", "/readyz", "/metrics")
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@dataclass
class Served:
    base: str
    token: str
    token_id: int


@pytest.fixture(scope="module")
async def served(
    redis_url: str, database_url: str, pool: asyncpg.Pool, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Served]:
    port = free_port()
    env = service_env(redis_url, database_url, f"schema{port}", API_PORT=str(port))
    fleet = Fleet(env, tmp_path_factory.mktemp("schema"))
    fleet.start("api")
    base = f"http://127.0.0.1:{port}"

    try:
        await wait_ready(base)
        token_id, secret = await tokens.create(pool, "schemathesis", "admin")
        yield Served(base, secret, token_id)
    finally:
        codes = fleet.stop_all()
        assert all(code == 0 for code in codes.values()), fleet.logs_text()
        assert "Traceback" not in fleet.logs_text(), fleet.logs_text()


# The document is built in code; test_the_served_document_is_this_one checks that the
# server serves exactly it, so the operations can be collected before any server runs.
schema = schemathesis.openapi.from_dict(openapi.DOCUMENT)


async def test_the_served_document_is_this_one(served: Served) -> None:
    async with aiohttp.ClientSession() as http, http.get(f"{served.base}/api/v1/openapi.json") as r:
        assert r.status == 200 and await r.json() == openapi.DOCUMENT


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_every_answer_matches_the_document(case: schemathesis.Case, served: Served) -> None:
    if case.path_parameters and case.path_parameters.get("token_id") == served.token_id:
        case.path_parameters["token_id"] = served.token_id + 10**9  # keep our own token
    checks = CHECKS
    if case.operation.method.upper() == "POST" and case.operation.path == "/api/v1/batches":
        # A multipart file is bytes whatever the generator meant to negate: a "negative"
        # upload serializes to an ordinary file, which is rightly accepted.
        checks = [c for c in CHECKS if c is not negative_data_rejection]
    case.call_and_validate(
        base_url=served.base,
        headers={"Authorization": f"Bearer {served.token}"},
        checks=checks,
        timeout=60,
    )


async def test_every_route_is_documented(redis_url: str, pool: asyncpg.Pool) -> None:
    redis = redis_client(redis_url)
    app = create_app(Resources(redis, pool, Keys("doc")), ApiSettings())
    await redis.aclose()
    served = {}
    for route, need in app[ROUTE_ROLES].items():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("formatter") or info.get("path")
        if path is None or not (path.startswith("/api/v1") or path in OPERATIONS_OUTSIDE_V1):
            continue  # the dashboard's pages and files
        served[(route.method.lower(), path)] = need
    documented = {
        (method, path): operation.get("x-role")
        for path, methods in openapi.DOCUMENT["paths"].items()
        for method, operation in methods.items()
    }
    assert served == documented  # the same routes, each with the role it really needs


def test_api_reference_lists_every_path() -> None:
    """docs/API.md names every documented path."""
    text = (Path(__file__).parents[1] / "docs" / "API.md").read_text()

    def shape(path: str) -> str:
        return re.sub(r"\{\w+\}", "{}", path)

    missing = [p for p in openapi.DOCUMENT["paths"] if shape(p) not in shape(text)]
    assert not missing, missing
