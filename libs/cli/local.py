"""The local tools: ``analyze`` runs a list (or a folder of images) through the whole
pipeline inside this process with a progress bar; ``up`` runs every service in one process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from imagestream.analyzer.providers import local as local_provider
from imagestream.common import (
    duplicates,
    export,
    ledger,
    pricing,
    profiles,
    providers,
    storage,
    tokens,
    webhooks,
)
from imagestream.common.connections import Resources
from imagestream.common.inputs import InputError
from imagestream.common.keys import Keys
from imagestream.common.settings import CommonSettings
from imagestream.common.storage import StorageError
from imagestream.ingest.service import ingest_list

from . import outputs, pipeline

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".avif", ".heic", ".heif"}
)


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit status 2."""


async def file_chunks(path: Path, size: int = 1 << 20) -> AsyncIterator[bytes]:
    with path.open("rb") as handle:
        while chunk := await asyncio.to_thread(handle.read, size):
            yield chunk


async def folder_list(folder: Path) -> AsyncIterator[bytes]:
    """A TXT list of file:// URLs of the images under ``folder``, in name order."""

    def walk() -> list[Path]:
        found = [
            Path(root) / name
            for root, _, names in os.walk(folder)
            for name in names
            if Path(name).suffix.lower() in IMAGE_SUFFIXES
        ]
        return sorted(found)

    paths = await asyncio.to_thread(walk)
    for start in range(0, len(paths), 10_000):
        chunk = paths[start : start + 10_000]
        yield "".join(p.resolve().as_uri() + "\n" for p in chunk).encode()


@dataclass
class RunOptions:
    #: A list file, a folder of images, or a list's s3://, gs:// or http(s) URL.
    input: str
    #: Results file, folder, or object-storage URL or prefix (see outputs.py).
    output: str | None
    #: Format of the results when ``output`` is a folder or prefix (or to override).
    format: str | None = None
    analyzer: str = "local"
    profile: str | None = None
    model: str | None = None
    budget_usd: float | None = None
    long_side: int | None = None
    mode: str | None = None
    name: str | None = None
    progress: bool = True
    #: False: analyze every image afresh instead of reusing cached analyses.
    cache: bool = True
    #: Where the batch's events go (default WEBHOOK_URL), and the secret signing them.
    webhook_url: str | None = None
    webhook_secret: str | None = None


@dataclass
class RunReport:
    batch: Any
    elapsed_s: float
    errors: dict[str, int]
    #: Where the results were written.
    output: str | None
    #: Webhook events not delivered before the run ended (left to the deployment).
    webhooks_left: int = 0


async def _check_output(output: str | None, fmt: str | None) -> export.Sink | None:
    if output is None:
        if fmt is not None:
            raise UsageError("--format needs -o (where to write the results)")
        return None
    try:
        sink = outputs.results_sink(output, fmt)
        await storage.check_destination(output)
    except StorageError as exc:
        raise UsageError(str(exc)) from None
    return sink


async def analyze(env: Mapping[str, str], options: RunOptions, stop: asyncio.Event) -> RunReport:
    """Run one list through an in-process pipeline and export its results."""
    source = options.input
    web_list = source.lower().startswith(("http://", "https://"))
    try:
        location = None if web_list else storage.parse(source)
    except StorageError as exc:
        raise UsageError(str(exc)) from None
    path = Path(location.key) if location is not None and location.scheme == "file" else None
    if path is not None and not path.exists():
        raise UsageError(f"{source} does not exist")
    # A list's name (its extension tells its format): the file's, or the URL path's end.
    list_name = path.name if path is not None else storage.file_name(source) or "list"
    sink = await _check_output(options.output, options.format)
    try:
        choice = providers.resolve_batch(
            {
                "analyzer": options.analyzer,
                "profile": options.profile,
                "model": options.model,
                "budget_usd": options.budget_usd,
                "cache": options.cache,
                "long_side": options.long_side,
                "mode": options.mode,
            },
            env=env,
            require_configured=True,
        )
    except profiles.ProfileError as exc:
        raise UsageError(str(exc)) from None
    is_folder = path is not None and path.is_dir()
    configured = pipeline.load_all(_run_env(env, choice), pipeline.PIPELINE)
    common: CommonSettings = configured["ingest"]
    # A private key prefix: this run's services take only this run's batch, even when
    # they share Redis and PostgreSQL with a deployment.
    prefix = f"{common.redis_prefix}-run-{secrets.token_hex(4)}"
    configured = {
        name: pipeline.replace(config, redis_prefix=prefix, log_level=config.log_level)
        for name, config in configured.items()
    }
    if is_folder:
        configured["fetcher"] = pipeline.replace(configured["fetcher"], fetch_allow_file=True)

    hook_url, hook_secret = await _webhook(options, common)

    async with pipeline.connected(common) as shared:
        res = Resources(shared.redis, shared.pool, Keys(prefix))
        batch_id = await ledger.create_batch(
            res.pool,
            ledger.NewBatch(
                name=options.name or list_name,
                pipeline=prefix,
                analyzer=choice.analyzer,
                profile=choice.profile,
                model=choice.model,
                budget_usd=choice.budget_usd,
                source_name=None if is_folder else list_name,
                options={**choice.options, "allow_file": True} if is_folder else choice.options,
                webhook_url=hook_url,
                webhook_secret=hook_secret,
            ),
        )
        deliverer = webhooks.Deliverer(res.pool, prefix, common.webhook_delivery())
        await deliverer.start()
        stopping = asyncio.Event()
        services = asyncio.create_task(
            pipeline.run_stages(res, configured, stopping, observe=False)
        )
        started = time.perf_counter()
        try:
            if path is None:
                chunks = storage.read_chunks(source, policy=common.list_address_policy())
            else:
                chunks = folder_list(path) if is_folder else file_chunks(path)
            try:
                await ingest_list(
                    res,
                    batch_id,
                    chunks,
                    filename="list.txt" if is_folder else list_name,
                    allow_file=is_folder,
                )
            except InputError as exc:
                raise UsageError(f"cannot read {source}: {exc}") from None
            batch = await _wait(res, batch_id, services, stop, options.progress)
            left = await deliverer.drain(batch_id, common.shutdown_grace_s) if hook_url else 0
        finally:
            stopping.set()
            with contextlib.suppress(Exception):
                await services
            await deliverer.stop()
            # Events the receiver has not taken yet go on being retried by the deployment's
            # api processes (this run's private pipeline ends here).
            await webhooks.hand_over(res.pool, batch_id, common.redis_prefix)
            await _forget_keys(res)
        elapsed = time.perf_counter() - started
        written = None
        if options.output is not None and sink is not None:
            written = outputs.results_url(options.output, str(batch_id), sink)
            await export_results(res, batch_id, written, sink, common.duplicate_max_distance)
        errors = await ledger.error_counts(res.pool, batch_id)
    return RunReport(batch, elapsed, errors, written, left)


async def _webhook(options: RunOptions, common: CommonSettings) -> tuple[str | None, str | None]:
    """The run's webhook URL (checked by the address guard) and secret; a secret made up
    here is printed once, as the api returns it once."""
    url = options.webhook_url or common.webhook_url
    if url is None:
        if options.webhook_secret is not None:
            raise UsageError("--webhook-secret needs --webhook-url (or WEBHOOK_URL)")
        return None, None
    try:
        url = await webhooks.check_target(url, common.webhook_policy())
        secret = options.webhook_secret or common.webhook_secret
        if secret is not None:
            webhooks.secret_key(secret)
    except webhooks.WebhookError as exc:
        raise UsageError(f"webhook: {exc}") from None
    if secret is None:
        secret = webhooks.new_secret()
        print(f"webhook secret (shown once): {secret}", file=sys.stderr, flush=True)
    return url, secret


def _run_env(env: Mapping[str, str], choice: providers.BatchChoice) -> Mapping[str, str]:
    """The settings of a run's private pipeline, which serves this one batch: the local
    analyzer loads its content models (seconds at start, hundreds of MB per worker) only
    when the batch is one of its ``content`` profile."""
    if choice.analyzer == local_provider.SPEC.name and choice.profile == local_provider.CONTENT:
        return env
    return {**env, "LOCAL_MODELS": "false"}


async def _wait(
    res: Resources,
    batch_id: uuid.UUID,
    services: asyncio.Task[None],
    stop: asyncio.Event,
    progress: bool,
) -> Any:
    bar = tqdm(
        total=0, unit="img", disable=None if progress else True, file=sys.stderr, dynamic_ncols=True
    )
    try:
        while True:
            batch = await ledger.batch(res.pool, batch_id)
            done = batch["succeeded"] + batch["failed"] + batch["skipped"] + batch["cancelled"]
            bar.total = batch["total"]
            bar.n = done
            bar.set_postfix(failed=batch["failed"], refresh=False)
            bar.refresh()
            # Paused by the analyzer (budget reached, no usable key): nobody resumes a local run.
            if batch["state"] in ledger.FINISHED_BATCH_STATES or batch["state"] == "paused":
                return batch
            if services.done():
                services.result()
                raise RuntimeError("the pipeline stopped before the batch finished")
            if stop.is_set():
                raise KeyboardInterrupt
            await asyncio.sleep(0.25)
    finally:
        bar.close()


async def _forget_keys(res: Resources) -> None:
    """Remove this run's private streams and blobs."""
    async for key in res.redis.scan_iter(match=f"{res.keys.prefix}:*", count=1000):
        await res.redis.delete(key)


async def export_results(
    res: Resources, batch_id: uuid.UUID, url: str, sink: export.Sink, max_distance: int
) -> None:
    """The batch's results, streamed to one file or object (which appears only when whole),
    with every near-duplicate group complete."""
    await duplicates.finish(res.pool, batch_id, max_distance)
    batch = await ledger.batch(res.pool, batch_id)
    selection = export.Selection(res.pool, batch_id, export.batch_layout(batch))
    await export.write_to(selection, sink, url, export.Written())


def summary(report: RunReport) -> str:
    b = report.batch
    total = b["total"]
    rate = (
        (b["succeeded"] + b["failed"] + b["skipped"]) / report.elapsed_s if report.elapsed_s else 0
    )
    lines = [
        f"{total} images: {b['succeeded']} succeeded, {b['failed']} failed, {b['skipped']} skipped"
        f" in {report.elapsed_s:.1f} s ({rate:.1f} images/s)"
    ]
    if report.errors:
        lines.append(
            "  failed by error class: " + ", ".join(f"{k} {v}" for k, v in report.errors.items())
        )
    if b["duplicates"] or b["invalid"]:
        lines.append(f"  duplicate URLs dropped: {b['duplicates']}, invalid rows: {b['invalid']}")
    if b["model"]:  # a model provider: what its tokens cost
        budget = b["budget_usd"]
        of_budget = f" of a {pricing.format_usd(budget)} budget" if budget is not None else ""
        lines.append(
            f"  {b['model']}, profile {b['profile']}: {b['input_tokens']} input and"
            f" {b['output_tokens']} output tokens, {pricing.format_usd(b['cost_usd'])}{of_budget}"
        )
    if b["state"] == "paused":
        lines.append(f"  stopped: the batch was paused ({b['state_reason']})")
    if report.output is not None:
        lines.append(f"  results: {report.output}")
    if report.webhooks_left:
        lines.append(
            f"  webhooks: {report.webhooks_left} event(s) not delivered yet; the api"
            " processes of this deployment go on retrying them"
        )
    return "\n".join(lines)


async def up(env: Mapping[str, str], stop: asyncio.Event) -> None:
    """Every service in this process, with the dashboard/API on API_PORT."""
    names = (*pipeline.PIPELINE, "api")
    configured = pipeline.load_all(env, names)
    common: CommonSettings = configured["api"]
    async with pipeline.connected(common) as res:
        if not configured["api"].auth_disabled:
            await res.pool.execute(
                "UPDATE api_tokens SET revoked_at = now()"
                " WHERE name = 'imagestream up' AND revoked_at IS NULL"
            )
            _, secret = await tokens.create(res.pool, "imagestream up", "admin")
            print(f"admin token (shown once): {secret}", flush=True)
        port = configured["api"].api_port
        print(f"imagestream is up: http://127.0.0.1:{port}/  (Ctrl-C stops)", flush=True)
        await pipeline.run_stages(res, configured, stop)
