"""Commands that drive a running api (``imagestream up``, or a deployment): submit a list,
watch, pause, resume, cancel, replay and export batches, from scripts or a terminal.

The api's address comes from ``IMAGESTREAM_URL`` (default http://127.0.0.1:5001) and the
token from ``IMAGESTREAM_TOKEN``. ``submit`` prints the new batch's id alone on stdout
(``ID=$(imagestream submit urls.csv)``); messages for people go to stderr. An error is one
line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from tqdm import tqdm

from imagestream.common import export, providers, storage
from imagestream.common.storage import StorageError

from . import outputs

DEFAULT_URL = "http://127.0.0.1:5001"
FINISHED = ("completed", "completed_with_errors", "cancelled", "failed")


class RemoteError(Exception):
    """The api refused, or could not be reached: one line for the user."""


def add_commands(sub: Any) -> None:
    """The remote commands' parsers (``sub`` is the main parser's subparsers)."""
    note = " (api at IMAGESTREAM_URL)"
    p = sub.add_parser("submit", help="upload a list to a running api as a new batch" + note)
    p.add_argument("file", type=Path, help="CSV, TXT or JSONL list (optionally .gz)")
    p.add_argument("--name", help="batch name (default: the file's name)")
    p.add_argument(
        "--analyzer", help=f"{', '.join(providers.names())} (default: the api's ANALYZER)"
    )
    p.add_argument("--profile", help="analysis profile (model providers)")
    p.add_argument("--model", help="model (model providers)")
    p.add_argument("--budget-usd", type=float, help="pause before the batch costs more")
    p.add_argument(
        "--mode", choices=("standard", "batch"), help="batch: the provider's Batch API, half price"
    )
    p.add_argument("--webhook-url", help="POST the batch's events here (default: the api's)")
    p.add_argument(
        "--webhook-secret", help="whsec_ secret signing them (default: the token's or the api's)"
    )
    p.add_argument("--wait", action="store_true", help="show progress until the batch ends")
    p = sub.add_parser("status", help="a batch's progress" + note)
    p.add_argument("id")
    p.add_argument("--json", action="store_true", help="the api's JSON, as is")
    for verb, text in (
        ("pause", "stop dispatching a batch's images"),
        ("resume", "continue a paused batch"),
        ("cancel", "cancel the rest of a batch"),
    ):
        sub.add_parser(verb, help=text + note).add_argument("id")
    p = sub.add_parser("replay", help="send a batch's failed images through again" + note)
    p.add_argument("id")
    p.add_argument(
        "--error-class", action="append", default=[], help="only this class (repeatable)"
    )
    p.add_argument("--stage", action="append", default=[], help="only failures at this stage")
    p = sub.add_parser("export", help="download a batch's results" + note)
    p.add_argument("id")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help=f"a file ({export.suffixes()}), a folder, or an s3://, gs:// or file:// URL or"
        " prefix (a folder or prefix gets <batch id>.<format>)",
    )
    p.add_argument(
        "--format",
        choices=export.FORMATS,
        help="format when -o is a folder or prefix (default csv)",
    )
    p.add_argument("--state", action="append", default=[], help="only items in this state")
    p.add_argument("--error-class", action="append", default=[], help="only this error class")
    p.add_argument(
        "--field", action="append", default=[], help="condition such as tags:contains:cat"
    )
    p.add_argument(
        "--duplicate-group",
        type=int,
        metavar="ITEM_ID",
        help="only this near-duplicate group (the id of its first item)",
    )
    p.add_argument(
        "--duplicates",
        choices=export.DUPLICATES,
        help="first: only the first image of each near-duplicate group",
    )


class Client:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.base = (env.get("IMAGESTREAM_URL") or DEFAULT_URL).rstrip("/")
        token = env.get("IMAGESTREAM_TOKEN", "").strip()
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def session(self) -> aiohttp.ClientSession:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300)
        return aiohttp.ClientSession(headers=self.headers, timeout=timeout)

    async def call(self, http: aiohttp.ClientSession, method: str, path: str, **kwargs: Any) -> Any:
        try:
            async with http.request(method, self.base + path, **kwargs) as response:
                body = await response.read()
                if response.status >= 400:
                    raise RemoteError(_error_text(response.status, body))
                return orjson.loads(body)
        except aiohttp.ClientConnectionError as exc:
            raise RemoteError(f"cannot reach the api at {self.base}: {exc}") from None


def _error_text(status: int, body: bytes) -> str:
    try:
        message = orjson.loads(body)["error"]["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        message = body.decode("utf-8", "replace").strip()[:200] or "no details"
    hint = " (set IMAGESTREAM_TOKEN)" if status == 401 else ""
    return f"{message}{hint} [HTTP {status}]"


def summary(status: dict[str, Any]) -> str:
    c = status["counts"]
    lines = [
        f"{status['name']} ({status['id']}): {status['state']}"
        + (f" - {status['state_reason']}" if status.get("state_reason") else ""),
        f"  {status['progress']:.1f}% of {c['total']} images: {c['succeeded']} succeeded,"
        f" {c['failed']} failed, {c['skipped']} skipped, {c['cancelled']} cancelled,"
        f" {c['remaining']} remaining",
    ]
    if status.get("rate_per_s"):
        eta = f", about {status['eta_s']:.0f} s left" if status.get("eta_s") else ""
        lines.append(f"  {status['rate_per_s']:.1f} images/s{eta}")
    if status.get("errors"):
        lines.append(
            "  failed by error class: " + ", ".join(f"{k} {v}" for k, v in status["errors"].items())
        )
    if c["duplicates"] or c["invalid"]:
        lines.append(f"  duplicate URLs dropped: {c['duplicates']}, invalid rows: {c['invalid']}")
    if status["cost_usd"] or status.get("budget_usd"):
        budget = f" of {status['budget_usd']:.2f} budget" if status.get("budget_usd") else ""
        lines.append(f"  cost so far: ${status['cost_usd']:.4f}{budget}")
    return "\n".join(lines)


# ---------------------------------------------------------------- commands
async def submit(client: Client, args: argparse.Namespace) -> int:
    path: Path = args.file
    if not await asyncio.to_thread(path.is_file):
        raise RemoteError(f"{path} is not a file")
    fields = {
        "batch_name": args.name,
        "analyzer": args.analyzer,
        "profile": args.profile,
        "model": args.model,
        "budget_usd": None if args.budget_usd is None else str(args.budget_usd),
        "mode": args.mode,
        "webhook_url": args.webhook_url,
        "webhook_secret": args.webhook_secret,
    }
    async with client.session() as http:
        with path.open("rb") as handle:  # streamed from disk by aiohttp
            form = aiohttp.FormData()
            form.add_field(
                "file", handle, filename=path.name, content_type="application/octet-stream"
            )
            for name, value in fields.items():
                if value is not None:
                    form.add_field(name, value)
            created = await client.call(http, "POST", "/api/v1/batches", data=form)
        print(created["id"])
        print(f"batch {created['name']!r} created ({created['source_format']})", file=sys.stderr)
        if "webhook_secret" in created:
            print(f"webhook secret (shown once): {created['webhook_secret']}", file=sys.stderr)
        if args.wait:
            status = await _watch(client, http, created["id"])
            print(summary(status), file=sys.stderr)
            return 0 if status["state"] in ("completed", "completed_with_errors") else 1
    return 0


async def _watch(client: Client, http: aiohttp.ClientSession, batch_id: str) -> dict[str, Any]:
    bar = tqdm(total=0, unit="img", file=sys.stderr, dynamic_ncols=True, disable=None)
    try:
        while True:
            status: dict[str, Any] = await client.call(
                http, "GET", f"/api/v1/batches/{batch_id}/status"
            )
            c = status["counts"]
            bar.total = c["total"]
            bar.n = c["total"] - c["remaining"]
            bar.set_postfix(failed=c["failed"], refresh=False)
            bar.refresh()
            if status["state"] in FINISHED:
                return status
            await asyncio.sleep(1.0)
    finally:
        bar.close()


async def status(client: Client, args: argparse.Namespace) -> int:
    async with client.session() as http:
        body = await client.call(http, "GET", f"/api/v1/batches/{args.id}/status")
    print(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode() if args.json else summary(body))
    return 0


def control(verb: str) -> Callable[[Client, argparse.Namespace], Any]:
    async def act(client: Client, args: argparse.Namespace) -> int:
        async with client.session() as http:
            body = await client.call(http, "POST", f"/api/v1/batches/{args.id}/{verb}")
        print(f"batch {body['id']}: {body['state']}")
        return 0

    return act


async def replay(client: Client, args: argparse.Namespace) -> int:
    request = {"error_class": args.error_class, "stage": args.stage}
    async with client.session() as http:
        body = await client.call(http, "POST", f"/api/v1/batches/{args.id}/replay", json=request)
    count, state = body["replayed"], body["state"]
    print(f"batch {body['id']}: {count} failed image(s) sent through again ({state})")
    return 0


async def export_results(client: Client, args: argparse.Namespace) -> int:
    try:
        sink = outputs.results_sink(args.output, args.format)
        url = outputs.results_url(args.output, args.id, sink)
        await storage.check_destination(url)
    except StorageError as exc:
        raise RemoteError(str(exc)) from None
    query: list[tuple[str, str]] = [("format", sink.name)]
    query += [("state", s) for s in args.state] + [("error_class", e) for e in args.error_class]
    query += [("field", f) for f in args.field]
    if args.duplicate_group is not None:
        query.append(("duplicate_group", str(args.duplicate_group)))
    if args.duplicates is not None:
        query.append(("duplicates", args.duplicates))
    started = time.perf_counter()
    size = 0
    async with client.session() as http:
        try:
            async with http.get(
                f"{client.base}/api/v1/batches/{args.id}/results", params=query
            ) as response:
                if response.status >= 400:
                    raise RemoteError(_error_text(response.status, await response.read()))
                # Streamed through: the file or object appears only when it is whole.
                async with storage.open_write(url) as out:
                    async for chunk in response.content.iter_chunked(1 << 20):
                        await out.write(chunk)
                        size += len(chunk)
        except aiohttp.ClientError as exc:
            raise RemoteError(f"export from {client.base} failed: {exc}") from None
        except StorageError as exc:
            raise RemoteError(str(exc)) from None
    elapsed = time.perf_counter() - started
    print(f"wrote {size:,} bytes to {url} in {elapsed:.1f} s", file=sys.stderr)
    return 0


HANDLERS: dict[str, Callable[[Client, argparse.Namespace], Any]] = {
    "submit": submit,
    "status": status,
    "pause": control("pause"),
    "resume": control("resume"),
    "cancel": control("cancel"),
    "replay": replay,
    "export": export_results,
}


def run(args: argparse.Namespace, env: dict[str, str]) -> int:
    try:
        return int(asyncio.run(HANDLERS[args.command](Client(env), args)))
    except RemoteError as exc:
        print(f"imagestream: {exc}", file=sys.stderr)
        return 1


COMMANDS: dict[str, Callable[[argparse.Namespace, dict[str, str]], int]] = {
    name: run for name in HANDLERS
}
