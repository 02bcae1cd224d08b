"""Gemini analyzer throughput against quota, and tokens and cost per image.

    uv run python bench/gemini.py [--images 6000] [--keys 3] [--rpm 600] [--latency-ms 1500]
        [--side-images 200] [--batch-images 1000]

Starts the Gemini emulator (``imagestream dev gemini-server``) with ``--keys`` keys, each in
its own project limited to ``--rpm`` requests per minute, answering after a lognormal
latency of median ``--latency-ms`` (sigma 0.5); then an analyzer and a writer, each
``imagestream serve`` in its own process, against the local Redis and a scratch PostgreSQL
database. ``--images`` distinct small JPEGs go through the real analyzer path (analyze
stream -> analyzer -> google-genai SDK -> emulator -> write stream -> writer -> ledger) with
the ``describe`` profile on gemini-2.5-flash-lite; then 200 images each for the other
profile and model pairs, for their tokens and cost; then ``--batch-images`` images with
``describe`` on gemini-2.5-flash-lite in batch-price mode (``mode: batch``: Gemini Batch
API jobs, which the emulator answers after 3 s).

Prints, per key: the requests per minute achieved over the run (first to last request) as
a fraction of its quota, next to the old system's 60 images/min per key; the share of
requests answered 429; and per profile and model: tokens and cost per 1,000 images at
standard (and Batch API) price, as the emulator bills them, and with the response schema's
tokens added (Gemini counts the schema as input; the emulator does not). Goals: >= 0.95 of the quota per key, <= 1 % 429s, describe
on gemini-2.5-flash-lite <= $0.10 per 1,000 images.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from _analyzer import (
    emulator_log,
    key_rates,
    migrate,
    service_env,
    submit,
    wait_done,
    wait_listening,
    write_keys_file,
)
from _analyzer import processes as shared_processes
from _common import REDIS_URL, free_port, machine, scratch_database, table

from imagestream.analyzer.providers.gemini import pricing as gemini_pricing
from imagestream.common import db, pricing, profiles
from imagestream.common.connections import redis_client
from imagestream.common.keys import Keys

OLD_SYSTEM_PER_KEY = 60  # images per minute per key (the seed README)
SIDE_RUNS = [
    ("describe", "gemini-2.5-flash"),
    ("moderation", "gemini-2.5-flash-lite"),
    ("moderation", "gemini-2.5-flash"),
]


@dataclass
class Setup:
    base_url: str
    prefix: str
    env: dict[str, str]


def setup(args: argparse.Namespace, dsn: str, workdir: Path) -> Setup:
    port = free_port()
    key_names = [f"bench-key-{i + 1}" for i in range(args.keys)]
    keys_file = write_keys_file(workdir / "keys.json", key_names, args.rpm)
    base_url = f"http://127.0.0.1:{port}"
    prefix = f"bench{secrets.token_hex(3)}"
    env = {
        **service_env(dsn, prefix, REDIS_URL, ("GEMINI_",)),
        "GEMINI_API_KEYS": ",".join(f"{k}@project-{i + 1}" for i, k in enumerate(key_names)),
        "GEMINI_BASE_URL": base_url,
        "GEMINI_RPM": str(args.rpm),
        "GEMINI_TPM": "4000000",
        "GEMINI_RPD": "0",
        "GEMINI_QUOTA_WINDOW_S": str(args.window_s),
        "GEMINI_BATCH_LINGER_S": "2",
        "GEMINI_BATCH_POLL_S": "1",
        "EMULATOR_ARGS": " ".join(
            [
                "--port", str(port), "--keys-file", str(keys_file),
                "--latency-median-ms", str(args.latency_ms), "--latency-sigma", "0.5",
                "--window-seconds", str(args.window_s), "--seed", "7",
            ]
        ),
    }  # fmt: skip
    return Setup(base_url, prefix, env)


def processes(setup: Setup, workdir: Path) -> contextlib.AbstractContextManager[None]:
    """The emulator, an analyzer and a writer, each its own process."""
    cli = [sys.executable, "-m", "imagestream.cli"]
    commands = {
        "emulator": [*cli, "dev", "gemini-server", *setup.env["EMULATOR_ARGS"].split()],
        "analyzer": [*cli, "serve", "analyzer"],
        "writer": [*cli, "serve", "writer"],
    }
    return shared_processes(commands, setup.env, workdir)


async def drive(args: argparse.Namespace, setup: Setup, dsn: str) -> None:
    redis = redis_client(REDIS_URL)
    pool = await db.create_pool(dsn, max_size=4)
    keys = Keys(setup.prefix)
    try:
        await wait_listening(setup.base_url)
        print(f"main run: {args.images} images, describe on gemini-2.5-flash-lite")
        main_id = await submit(pool, redis, keys, "describe", "gemini-2.5-flash-lite", args.images)
        elapsed = await wait_done(pool, [main_id], "describe/flash-lite")
        main_log = await emulator_log(setup.base_url)
        print(f"side runs: {args.side_images} images for each other profile and model")
        side_ids = [await submit(pool, redis, keys, p, m, args.side_images) for p, m in SIDE_RUNS]
        await wait_done(pool, side_ids, "side runs")
        print(f"batch-price mode: {args.batch_images} images, describe on gemini-2.5-flash-lite")
        batch_mode_id = await submit(
            pool, redis, keys, "describe", "gemini-2.5-flash-lite", args.batch_images, "batch"
        )
        batch_mode_s = await wait_done(pool, [batch_mode_id], "batch mode")
        jobs = await pool.fetchval(
            "SELECT count(*) FROM provider_jobs WHERE batch_id = $1", batch_mode_id
        )
        print(f"  {args.batch_images} images in {jobs} Batch API jobs, {batch_mode_s:.0f} s")
        batches = await pool.fetch(
            "SELECT id, profile, model, options, succeeded, failed, input_tokens, output_tokens,"
            " cost_usd FROM batches WHERE id = ANY($1::uuid[]) ORDER BY created_at",
            [main_id, *side_ids, batch_mode_id],
        )
        thoughts = {
            r["batch_id"]: r["t"]
            for r in await pool.fetch(
                "SELECT batch_id, sum(thought_tokens) AS t FROM results GROUP BY batch_id"
            )
        }
    finally:
        async for key in redis.scan_iter(match=f"{setup.prefix}:*", count=1000):
            await redis.delete(key)
        await redis.aclose()
        await pool.close()
    report(args, elapsed, main_log, batches, thoughts)


def report(
    args: argparse.Namespace,
    elapsed: float,
    log: list[dict[str, Any]],
    batches: list[asyncpg.Record],
    thoughts: dict[uuid.UUID, int],
) -> None:
    calls = [e for e in log if e["method"] == "generateContent"]
    rows = []
    for rate in key_rates(calls, args.window_s):
        per_minute = rate.per_window * 60 / args.window_s
        rows.append(
            [rate.key, rate.answered, rate.refused, f"{rate.span_s:.1f}", f"{per_minute:.1f}",
             f"{rate.per_window / args.rpm:.3f}", f"{per_minute / OLD_SYSTEM_PER_KEY:.1f}x"]
        )  # fmt: skip
    refused_all = sum(e["status"] == 429 for e in calls)
    print()
    print(f"Machine: {machine()}")
    print(
        f"Emulator: {args.keys} keys (one project each) at {args.rpm} RPM, lognormal latency"
        f" median {args.latency_ms:.0f} ms (sigma 0.5), quota window {args.window_s:g} s."
        " Figures are preliminary: the machine is shared."
    )
    print()
    print(
        table(
            [
                "key",
                "answered",
                "429",
                "span s",
                "requests/min",
                "of quota",
                f"vs old {OLD_SYSTEM_PER_KEY}/min/key",
            ],
            rows,
        )
    )
    print()
    print(
        f"{len(calls)} requests for {args.images} images in {elapsed:.0f} s;"
        f" answered 429: {refused_all} ({100 * refused_all / max(1, len(calls)):.2f} %)"
    )
    print()
    cost_rows = []
    catalog = profiles.load_catalog()
    for b in batches:
        n = max(1, b["succeeded"])
        per_k = 1000 / n
        mode = (b["options"] or {}).get("mode", "standard")
        discount = pricing.BATCH_DISCOUNT if mode == "batch" else 1.0
        cost = float(b["cost_usd"]) * per_k  # as billed: at the batch's own price
        # Gemini counts the response schema as input; the emulator does not.
        schema = catalog.profile(b["profile"]).schema_tokens
        schema_usd = (
            1000
            * schema
            * pricing.price_of(b["model"], gemini_pricing.PRICES).input
            / 1e6
            * discount
        )
        at_batch_price = cost if mode == "batch" else cost * pricing.BATCH_DISCOUNT
        cost_rows.append(
            [b["profile"], b["model"], mode, b["succeeded"], b["failed"],
             f"{b['input_tokens'] * per_k:,.0f}", f"{b['output_tokens'] * per_k:,.0f}",
             f"{(thoughts.get(b['id']) or 0) * per_k:,.0f}",
             f"${cost:.4f}", f"${at_batch_price:.4f}",
             f"{schema * 1000:,}", f"${cost + schema_usd:.4f}"]
        )  # fmt: skip
    print(
        table(
            [
                "profile",
                "model",
                "mode",
                "images",
                "failed",
                "input tok/1k",
                "output tok/1k",
                "thought tok/1k",
                "cost/1k billed",
                "cost/1k (Batch API price)",
                "+ schema tok/1k",
                "billed with schema",
            ],
            cost_rows,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--side-images", type=int, default=200)
    parser.add_argument("--batch-images", type=int, default=1000)
    parser.add_argument("--keys", type=int, default=3)
    parser.add_argument("--rpm", type=int, default=600)
    parser.add_argument("--latency-ms", type=float, default=1500)
    parser.add_argument("--window-s", type=float, default=60)
    args = parser.parse_args()
    with scratch_database() as dsn, tempfile.TemporaryDirectory() as tmp:
        asyncio.run(migrate(dsn))
        made = setup(args, dsn, Path(tmp))
        with processes(made, Path(tmp)):
            asyncio.run(drive(args, made, dsn))


if __name__ == "__main__":
    main()
