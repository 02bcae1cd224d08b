"""Object-storage clients side by side: fsspec (s3fs) vs obstore, against moto's S3 server.

    uv run python bench/storage.py [--list-mb 200] [--export-mb 200] [--objects 2000] [--runs 3]

The three things imagestream does with object storage, each timed in a fresh process per
client (so peak RSS is the client's own), against one moto S3 server on 127.0.0.1 in this
process:

* **read a list**: stream one ``--list-mb`` object in 1 MiB pieces (a URL list read by ingest);
* **write an export**: stream ``--export-mb`` of 1 MiB pieces into a multipart upload;
* **small GETs**: fetch ``--objects`` 60 KiB objects, 32 at a time (images fetched by the
  fetcher).

Both clients are used from asyncio: obstore through ``imagestream.common.storage`` (what
the services run: ranged reads of ``READ_BYTES``, 8 MiB parts); s3fs through its async API (``open_async``, ``_cat_file``) for reads, and its file object in a thread
for writes (s3fs has no async writer). Reported per case: wall seconds and client CPU
seconds (medians of ``--runs``), peak RSS of the client process, and obstore's ratio to s3fs.

moto is a Python server: it caps throughput for both clients alike, so the client CPU
seconds are the fairer comparison of the clients themselves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import free_port, machine, median, table

BUCKET = "bench"
PIECE = 1 << 20
SMALL = 60 * 1024
CONCURRENCY = 32
CLIENTS = ("s3fs", "obstore")
CASES = ("read", "write", "gets")


def _env(endpoint: str) -> dict[str, str]:
    return {
        **os.environ,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
        # Neither client may look for credentials anywhere but the environment.
        "AWS_EC2_METADATA_DISABLED": "true",
    }


# ---------------------------------------------------------------- one case, in a child
async def _s3fs_case(case: str, args: argparse.Namespace) -> int:
    import s3fs

    fs = s3fs.S3FileSystem(asynchronous=True)
    await fs.set_session()
    moved = 0
    if case == "read":
        handle = await fs.open_async(f"{BUCKET}/list.bin", "rb")
        while piece := await handle.read(PIECE):
            moved += len(piece)
        await handle.close()
    elif case == "write":
        sync_fs = s3fs.S3FileSystem()

        def write() -> int:
            piece = b"x" * PIECE
            with sync_fs.open(f"{BUCKET}/export-s3fs.bin", "wb", block_size=10 * PIECE) as out:
                for _ in range(args.export_mb):
                    out.write(piece)
            return args.export_mb * PIECE

        moved = await asyncio.to_thread(write)
    else:
        gate = asyncio.Semaphore(CONCURRENCY)

        async def get(i: int) -> int:
            async with gate:
                return len(await fs._cat_file(f"{BUCKET}/small/{i:06d}"))

        moved = sum(await asyncio.gather(*(get(i) for i in range(args.objects))))
    return moved


async def _obstore_case(case: str, args: argparse.Namespace) -> int:
    """obstore as imagestream uses it: through imagestream.common.storage."""
    from imagestream.common import storage

    moved = 0
    if case == "read":
        async for piece in storage.read_chunks(f"s3://{BUCKET}/list.bin", PIECE):
            moved += len(piece)
    elif case == "write":
        piece = b"x" * PIECE
        async with storage.open_write(f"s3://{BUCKET}/export-obstore.bin") as out:
            for _ in range(args.export_mb):
                await out.write(piece)
        moved = args.export_mb * PIECE
    else:
        gate = asyncio.Semaphore(CONCURRENCY)

        async def get(i: int) -> int:
            async with gate:
                return len(await storage.read_capped(f"s3://{BUCKET}/small/{i:06d}", 1 << 30))

        moved = sum(await asyncio.gather(*(get(i) for i in range(args.objects))))
    return moved


def _peak_rss_mb() -> float:
    """VmHWM: unlike ru_maxrss it starts afresh at exec, so the parent's size is not counted."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(args: argparse.Namespace) -> None:
    # Imported before the clock starts: import time is not the client's speed.
    if args.client == "s3fs":
        import s3fs  # noqa: F401

        run = _s3fs_case
    else:
        from imagestream.common import storage  # noqa: F401

        run = _obstore_case
    baseline = _peak_rss_mb()
    cpu0 = time.process_time()
    started = time.perf_counter()
    moved = asyncio.run(run(args.case, args))
    wall = time.perf_counter() - started
    peak = _peak_rss_mb()
    print(
        json.dumps(
            {
                "wall": wall,
                "cpu": time.process_time() - cpu0,
                "rss_mb": peak,
                "rss_growth_mb": peak - baseline,
                "bytes": moved,
            }
        )
    )


# ---------------------------------------------------------------- the driver
def _seed(endpoint: str, args: argparse.Namespace) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=BUCKET)
    line = b"https://images.example.org/photos/0000000000.jpg,some caption,1\n"
    body = line * (args.list_mb * PIECE // len(line))
    s3.put_object(Bucket=BUCKET, Key="list.bin", Body=body)
    small = os.urandom(SMALL)
    for i in range(args.objects):
        s3.put_object(Bucket=BUCKET, Key=f"small/{i:06d}", Body=small)


def _measure(endpoint: str, client: str, case: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--child",
        "--client",
        client,
        "--case",
        case,
        "--export-mb",
        str(args.export_mb),
        "--objects",
        str(args.objects),
    ]
    out = subprocess.run(command, env=_env(endpoint), capture_output=True, text=True, check=False)
    lines = out.stdout.strip().splitlines()
    if not lines:
        raise SystemExit(f"{client} {case} failed (exit {out.returncode}):\n{out.stderr}")
    result: dict[str, Any] = json.loads(lines[-1])
    # The work finished (its result is printed) but the process died on its way out.
    result["crashed_on_exit"] = out.returncode != 0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list-mb", type=int, default=200)
    parser.add_argument("--export-mb", type=int, default=200)
    parser.add_argument("--objects", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", choices=CLIENTS, help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(_env(endpoint))
    try:
        _seed(endpoint, args)
        results: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for _ in range(args.runs):
            for case in CASES:
                for client in CLIENTS:
                    results.setdefault((case, client), []).append(
                        _measure(endpoint, client, case, args)
                    )
    finally:
        server.stop()

    sizes = {
        "read": f"stream a {args.list_mb} MiB list",
        "write": f"multipart-write {args.export_mb} MiB",
        "gets": f"{args.objects} GETs of 60 KiB, {CONCURRENCY} at a time",
    }
    rows = []
    for case in CASES:
        wall = {c: median([r["wall"] for r in results[case, c]]) for c in CLIENTS}
        cpu = {c: median([r["cpu"] for r in results[case, c]]) for c in CLIENTS}
        for client in CLIENTS:
            runs = results[case, client]
            mb = runs[0]["bytes"] / PIECE
            rows.append(
                [
                    sizes[case],
                    client,
                    f"{wall[client]:.2f}",
                    f"{mb / wall[client]:.0f}",
                    f"{cpu[client]:.2f}",
                    f"{max(r['rss_mb'] for r in runs):.0f}",
                    f"{wall[client] / wall['s3fs']:.2f}",
                    f"{cpu[client] / cpu['s3fs']:.2f}",
                    f"{sum(r['crashed_on_exit'] for r in runs)}/{len(runs)}",
                ]
            )
    print(machine())
    print(f"moto {_version('moto')}, s3fs {_version('s3fs')}, obstore {_version('obstore')}")
    print(f"medians of {args.runs} runs, one fresh client process per run\n")
    print(
        table(
            [
                "case",
                "client",
                "wall s",
                "MiB/s",
                "client CPU s",
                "peak RSS MB",
                "wall vs s3fs",
                "CPU vs s3fs",
                "died on exit",
            ],
            rows,
        )
    )


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
