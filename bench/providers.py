"""Every keyed provider against its quota, each through its emulator, one after the other
in one run.

    uv run python bench/providers.py [--images 2000] [--batch-images 200] [--keys 2]
        [--rpm 300] [--latency-ms 1500] [--window-s 60] [--providers gemini,openai,anthropic]

Starts the Gemini, OpenAI-compatible and Anthropic-compatible emulators
(``imagestream dev <name>-server``), each with ``--keys`` keys in a project of their own
limited to ``--rpm`` requests per window, answering after a lognormal latency of median
``--latency-ms`` (sigma 0.5); then one analyzer and one writer (``imagestream serve``, each
its own process) configured for all three, against the local Redis and a scratch
PostgreSQL database. For each provider in turn, ``--images`` distinct small JPEGs go
through the real analyzer path (analyze stream -> analyzer -> the provider's SDK ->
emulator -> write stream -> writer -> ledger) with the ``describe`` profile on the
provider's default model, then ``--batch-images`` more in batch mode (its Batch API,
which the emulators answer after 3 s).

Prints, per key: the requests per minute it got answered over the run (first to last
answer) as a share of its quota, and its 429s; per provider: the share of requests
answered 429 and the cost per 1,000 images as billed at standard and at Batch API price.
Goals: >= 0.95 of the quota per key, <= 1 % 429s, for every provider.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _analyzer import (
    emulator_log,
    key_rates,
    migrate,
    processes,
    service_env,
    submit,
    wait_done,
    wait_listening,
    write_keys_file,
)
from _common import REDIS_URL, free_port, machine, scratch_database, table

from imagestream.common import db
from imagestream.common.connections import redis_client
from imagestream.common.keys import Keys

GOAL_SHARE, GOAL_429 = 0.95, 0.01


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    model: str
    #: The emulator's request-log method of one analysis call.
    call: str
    #: What the SDK's base URL adds to the emulator's address.
    path: str = ""

    @property
    def setting(self) -> str:
        return self.name.upper()


PROVIDERS = {
    p.name: p
    for p in (
        Provider("gemini", "gemini-2.5-flash-lite", "generateContent"),
        Provider("openai", "gpt-4.1-mini", "chat.completions", "/v1"),
        Provider("anthropic", "claude-haiku-4-5", "messages"),
    )
}


@dataclass
class Emulator:
    provider: Provider
    base_url: str
    command: list[str]


def emulators(args: argparse.Namespace, chosen: list[Provider], workdir: Path) -> list[Emulator]:
    cli = [sys.executable, "-m", "imagestream.cli"]
    made = []
    for provider in chosen:
        port = free_port()
        keys = [f"{provider.name}-key-{i + 1}" for i in range(args.keys)]
        keys_file = write_keys_file(workdir / f"{provider.name}-keys.json", keys, args.rpm)
        command = [
            *cli, "dev", f"{provider.name}-server", "--port", str(port),
            "--keys-file", str(keys_file), "--latency-median-ms", str(args.latency_ms),
            "--latency-sigma", "0.5", "--window-seconds", str(args.window_s), "--seed", "7",
        ]  # fmt: skip
        made.append(Emulator(provider, f"http://127.0.0.1:{port}", command))
    return made


def environment(
    args: argparse.Namespace, dsn: str, prefix: str, running: list[Emulator]
) -> dict[str, str]:
    ours = tuple(f"{p.setting}_" for p in PROVIDERS.values())
    env = {**service_env(dsn, prefix, REDIS_URL, ours), "GEMINI_RPD": "0"}
    for emulator in running:
        s = emulator.provider.setting
        env |= {
            f"{s}_API_KEYS": ",".join(
                f"{emulator.provider.name}-key-{i + 1}@project-{i + 1}" for i in range(args.keys)
            ),
            f"{s}_BASE_URL": emulator.base_url + emulator.provider.path,
            f"{s}_RPM": str(args.rpm),
            f"{s}_TPM": "4000000",
            f"{s}_QUOTA_WINDOW_S": str(args.window_s),
            # The default 1 s margin of a 60 s window, scaled with a shortened window.
            f"{s}_QUOTA_MARGIN_S": str(args.window_s / 60),
            f"{s}_BATCH_LINGER_S": "2",
            f"{s}_BATCH_POLL_S": "1",
        }
    return env


@dataclass
class Measured:
    provider: Provider
    calls: list[dict[str, Any]]
    elapsed_s: float
    batches: dict[str, Any]  # mode -> ledger row


async def drive(
    args: argparse.Namespace, running: list[Emulator], dsn: str, prefix: str
) -> list[Measured]:
    redis = redis_client(REDIS_URL)
    pool = await db.create_pool(dsn, max_size=4)
    keys = Keys(prefix)
    measured = []
    try:
        for emulator in running:
            await wait_listening(emulator.base_url)
        for emulator in running:
            provider = emulator.provider
            print(f"{provider.name}: {args.images} images, describe on {provider.model}")
            ids: dict[str, uuid.UUID] = {}
            ids["standard"] = await submit(
                pool, redis, keys, "describe", provider.model, args.images, analyzer=provider.name
            )
            elapsed = await wait_done(pool, [ids["standard"]], provider.name)
            calls = [
                e for e in await emulator_log(emulator.base_url) if e["method"] == provider.call
            ]
            print(f"{provider.name}: {args.batch_images} images in batch mode")
            ids["batch"] = await submit(
                pool, redis, keys, "describe", provider.model, args.batch_images, "batch",
                analyzer=provider.name,
            )  # fmt: skip
            await wait_done(pool, [ids["batch"]], f"{provider.name} batch mode")
            rows = {
                mode: await pool.fetchrow(
                    "SELECT succeeded, failed, cost_usd FROM batches WHERE id = $1", batch_id
                )
                for mode, batch_id in ids.items()
            }
            measured.append(Measured(provider, calls, elapsed, rows))
    finally:
        async for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
            await redis.delete(key)
        await redis.aclose()
        await pool.close()
    return measured


def per_thousand(row: Any) -> str:
    return f"${float(row['cost_usd']) * 1000 / max(1, row['succeeded']):.4f}"


def report(args: argparse.Namespace, measured: list[Measured]) -> None:
    key_rows = []
    summary = []
    for m in measured:
        rates = key_rates(m.calls, args.window_s)
        for rate in rates:
            key_rows.append(
                [m.provider.name, rate.key, rate.answered, rate.refused, f"{rate.span_s:.1f}",
                 f"{rate.per_window * 60 / args.window_s:.1f}", f"{rate.per_window / args.rpm:.3f}"]
            )  # fmt: skip
        refused = sum(e["status"] == 429 for e in m.calls)
        share_429 = refused / max(1, len(m.calls))
        worst = min((r.per_window / args.rpm for r in rates), default=0.0)
        standard, batch = m.batches["standard"], m.batches["batch"]
        met = worst >= GOAL_SHARE and share_429 <= GOAL_429
        summary.append(
            [m.provider.name, m.provider.model, f"{standard['succeeded']}/{args.images}",
             f"{m.elapsed_s:.0f}", len(m.calls), f"{worst:.3f}", f"{100 * share_429:.2f} %",
             per_thousand(standard), f"{batch['succeeded']}/{args.batch_images}",
             per_thousand(batch), "yes" if met else "NO"]
        )  # fmt: skip
    print()
    print(f"Machine: {machine()}")
    print(
        f"Emulators: {args.keys} keys each (one project each) at {args.rpm} RPM, lognormal"
        f" latency median {args.latency_ms:.0f} ms (sigma 0.5), quota window {args.window_s:g} s."
    )
    print()
    headers = ["provider", "key", "answered", "429", "span s", "requests/min", "of quota"]
    print(table(headers, key_rows))
    print()
    headers = [
        "provider", "model", "images", "s", "requests", "worst key of quota", "429 share",
        "cost/1k standard", "batch-mode images", "cost/1k batch", f"goal (>= {GOAL_SHARE} quota, <= 1 % 429)",
    ]  # fmt: skip
    print(table(headers, summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-images", type=int, default=200)
    parser.add_argument("--keys", type=int, default=2)
    parser.add_argument("--rpm", type=int, default=300)
    parser.add_argument("--latency-ms", type=float, default=1500)
    parser.add_argument("--window-s", type=float, default=60)
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    args = parser.parse_args()
    chosen = [PROVIDERS[name.strip()] for name in args.providers.split(",")]
    prefix = f"bench{secrets.token_hex(3)}"
    cli = [sys.executable, "-m", "imagestream.cli"]
    with scratch_database() as dsn, tempfile.TemporaryDirectory() as tmp:
        asyncio.run(migrate(dsn))
        running = emulators(args, chosen, Path(tmp))
        commands = {f"{e.provider.name}-server": e.command for e in running} | {
            "analyzer": [*cli, "serve", "analyzer"],
            "writer": [*cli, "serve", "writer"],
        }
        with processes(commands, environment(args, dsn, prefix, running), Path(tmp)):
            measured = asyncio.run(drive(args, running, dsn, prefix))
    report(args, measured)


if __name__ == "__main__":
    main()
