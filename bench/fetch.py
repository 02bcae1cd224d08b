"""The fetch stage alone, next to img2dataset on the same URLs and the same output size.

    uv run python bench/fetch.py [--images 2000] [--runs 3] [--pools] [--no-netns]

1. Generates a corpus of JPEGs (default 2,000, sizes drawn between 640x480 and
   3000x2000, cropped from real photographs by ``imagestream.devtools.corpus``, quality
   90), cached under bench/.cache/, and serves it on 127.0.0.1 from separate server
   processes (``--servers``, default 2: one aiohttp process needs ~1 ms of CPU per image,
   which would otherwise cap a run near the rates measured here; the table shows the
   servers' CPU per image).
2. Installs img2dataset from PyPI into its own venv (bench/.cache/img2dataset-venv, with
   ``uv venv`` + ``uv pip install``), outside the project's environment.
3. Enters a new network namespace with nothing but loopback (``unshare -n``, as root),
   starts the servers there, and runs, alternately, ``--runs`` times each:
   * imagestream: the fetcher's ``ImageLoader`` (guarded aiohttp download with the
     fetcher's settings; sniff, bomb guard, DCT-scaled decode, EXIF orientation, LANCZOS
     downscale to a 768 px long side, one JPEG encode, sha256) in its decode pool, on
     uvloop; FETCH_PER_HOST is raised to FETCH_CONCURRENCY, since all URLs share a host;
   * img2dataset with ``--processes_count`` = cores, ``--thread_count`` 64 and shards of
     200 URLs (its best here of 16/32/64/256 threads and 50-250 URLs per shard: its
     pool replaces a worker process every 5 shards, ~3 CPU-seconds each, so smaller
     shards cost it more than the idle tail they save), output
     resized to the same 768 px long side (``keep_ratio_largest``, only if bigger, JPEG
     quality 85, no re-encode of images it does not resize, sha256, X-Robots-Tag check:
     the same work). Its images/s is taken over the span its shards report (its
     start-up excluded); its CPU is that of its processes less a one-image run's.
   Inside the namespace nothing can reach anything but loopback, so neither contender
   can touch the network; ``--no-netns`` runs in the host namespace instead.
4. Prints medians: images/s, MB/s, CPU-seconds per image, and the ratio.

``--pools`` adds a run of imagestream with a thread pool instead of its process pool (the
measurement behind the choice in services/fetcher/loader.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import CACHE, machine, median, serve_directory, table

SIZES = ((640, 480), (3000, 2000))
LONG_SIDE = 768
I2D_THREADS = 64
I2D_SHARD = 200
I2D_VENV = CACHE / "img2dataset-venv"


@dataclass
class Run:
    name: str
    images: int
    seconds: float
    megabytes: float
    cpu_s: float
    note: str = ""

    @property
    def rate(self) -> float:
        return self.images / self.seconds


# ------------------------------------------------------------------ corpus


def _make_one(args: tuple[str, int, int, int]) -> tuple[str, int]:
    from imagestream.devtools import corpus

    path, width, height, seed = args
    sample = corpus.sample(Path(path).name, width, height, "JPEG", seed=seed)
    Path(path).write_bytes(sample.data)
    return path, len(sample.data)


def make_corpus(count: int, seed: int) -> Path:
    directory = CACHE / f"fetch-corpus-{count}-{seed}"
    done = directory / ".complete"
    if done.exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    (w0, h0), (w1, h1) = SIZES
    jobs = []
    for i in range(count):
        t = rng.random()
        width, height = int(w0 + (w1 - w0) * t), int(h0 + (h1 - h0) * t)
        if rng.random() < 0.25:  # some portraits
            width, height = height, width
        jobs.append((str(directory / f"{i:06d}.jpg"), width, height, seed * 1_000_003 + i))
    started = time.perf_counter()
    with ProcessPoolExecutor(os.cpu_count() or 2) as pool:
        for n, _ in enumerate(pool.map(_make_one, jobs, chunksize=8), 1):
            if n % 250 == 0:
                print(f"  corpus: {n}/{count} ({time.perf_counter() - started:.0f} s)", flush=True)
    done.touch()
    return directory


# ------------------------------------------------------------------ contenders


def cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def proc_cpu(pids: list[int]) -> float:
    """CPU seconds of running processes (utime + stime from /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


async def imagestream_run(urls: list[str], pool: str) -> Run:
    from imagestream.common.errors import ItemError
    from imagestream.fetcher.loader import ImageLoader
    from imagestream.fetcher.settings import FetcherSettings

    defaults = FetcherSettings()
    settings = FetcherSettings(
        fetch_allowed_cidrs=("127.0.0.1/32",),
        fetch_per_host=defaults.fetch_concurrency,
        analysis_long_side=LONG_SIDE,
    )
    loader = ImageLoader(settings)
    if pool == "thread":  # the alternative measured against the configured process pool
        loader.pool.shutdown()
        loader.pool = ThreadPoolExecutor(os.cpu_count() or 2)  # type: ignore[assignment]
    known = {p.pid for p in multiprocessing.active_children()}

    def workers() -> dict[int, float]:
        """CPU seconds of the process pool's workers (unreaped children: not in rusage)."""
        pids = [p.pid for p in multiprocessing.active_children() if p.pid not in known]
        return {pid: proc_cpu([pid]) for pid in pids if pid is not None}

    try:
        # Connections, pool workers and caches warm.
        await asyncio.gather(
            *(loader.load(u, LONG_SIDE) for u in urls[: 4 * (os.cpu_count() or 2)])
        )
        failures: list[str] = []
        downloaded = 0

        async def one(url: str) -> None:
            nonlocal downloaded
            try:
                prepared = await loader.load(url, LONG_SIDE)
            except ItemError as exc:
                failures.append(f"{url}: {exc}")
            else:
                downloaded += prepared.facts.bytes

        cpu0, workers0, started = cpu_self(), workers(), time.perf_counter()
        await asyncio.gather(*(one(u) for u in urls))
        seconds = time.perf_counter() - started
        workers1 = workers()
        cpu = cpu_self() - cpu0 + sum(t - workers0.get(pid, 0.0) for pid, t in workers1.items())
    finally:
        await loader.close()
    if failures:
        raise SystemExit(f"imagestream failed {len(failures)} images, e.g. {failures[0]}")
    return Run(f"imagestream ({pool} pool)", len(urls), seconds, downloaded / 1e6, cpu)


def i2d_install() -> Path:
    exe = I2D_VENV / "bin" / "img2dataset"
    if not exe.exists():
        print("installing img2dataset into", I2D_VENV, flush=True)
        subprocess.run(["uv", "venv", "-q", "-p", "3.11", str(I2D_VENV)], check=True)
        subprocess.run(
            [
                "uv",
                "pip",
                "install",
                "-q",
                "--python",
                str(I2D_VENV / "bin" / "python"),
                "img2dataset",
            ],
            check=True,
        )
    return exe


def i2d_command(exe: Path, url_list: Path, output: Path, threads: int, shard: int) -> list[str]:
    cores = os.cpu_count() or 2
    return [
        str(exe),
        f"--url_list={url_list}",
        "--input_format=txt",
        f"--output_folder={output}",
        "--output_format=files",
        f"--processes_count={cores}",
        f"--thread_count={threads}",
        f"--number_sample_per_shard={shard}",
        f"--image_size={LONG_SIDE}",
        "--resize_mode=keep_ratio_largest",
        "--resize_only_if_bigger=True",
        "--skip_reencode=True",
        "--encode_format=jpg",
        "--encode_quality=85",
        "--compute_hash=sha256",
        "--extract_exif=False",
        "--timeout=30",
        "--retries=0",
        "--enable_wandb=False",
        "--distributor=multiprocessing",
    ]


def i2d_run(exe: Path, urls: list[str], threads: int, shard: int, megabytes: float) -> Run:
    with tempfile.TemporaryDirectory(prefix="i2d-") as tmp:
        url_list = Path(tmp) / "urls.txt"
        url_list.write_text("\n".join(urls) + "\n")
        output = Path(tmp) / "out"
        cpu0 = cpu_children()
        started = time.perf_counter()
        proc = subprocess.run(
            i2d_command(exe, url_list, output, threads, shard),
            capture_output=True,
            text=True,
            check=False,
        )
        wall = time.perf_counter() - started
        cpu = cpu_children() - cpu0
        if proc.returncode != 0:
            raise SystemExit(f"img2dataset failed:\n{proc.stderr[-3000:]}")
        shards = [json.loads(p.read_text()) for p in output.glob("*_stats.json")]
        success = sum(s["successes"] for s in shards)
        if success != len(urls):
            raise SystemExit(f"img2dataset: {success} of {len(urls)} images; {proc.stdout[-2000:]}")
        span = max(s["end_time"] for s in shards) - min(s["start_time"] for s in shards)
        check_output_sizes(output)
    return Run(
        f"img2dataset (threads {threads})",
        len(urls),
        span,
        megabytes,
        cpu,
        note=f"wall with start-up {wall:.1f} s",
    )


def check_output_sizes(output: Path) -> None:
    """img2dataset wrote images of the same size as ours: long side at most 768 (and
    exactly 768 for the larger ones)."""
    from PIL import Image

    sides = []
    for path in output.rglob("*.jpg"):
        with Image.open(path) as im:
            sides.append(max(im.size))
    if not sides or max(sides) > LONG_SIDE or (len(sides) > 1 and max(sides) != LONG_SIDE):
        raise SystemExit(
            f"img2dataset output long sides {min(sides)}..{max(sides)}, not {LONG_SIDE}"
        )


# ------------------------------------------------------------------ main


def in_isolated_namespace() -> bool:
    import socket

    return sorted(name for _, name in socket.if_nameindex()) == ["lo"]


def reexec_in_netns() -> None:
    """Run this script again in a loopback-only network namespace (root + unshare)."""
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if not unshare or not ip:
        raise SystemExit("unshare/ip not found: run with --no-netns")
    script = f'{ip} link set lo up && exec "$@"'
    args = [sys.executable, *sys.argv, "--in-netns"]
    code = subprocess.run([unshare, "--net", "sh", "-c", script, "sh", *args], check=False)
    raise SystemExit(code.returncode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--i2d-threads", type=int, default=I2D_THREADS)
    parser.add_argument("--i2d-shard", type=int, default=I2D_SHARD)
    parser.add_argument("--pools", action="store_true", help="also measure a thread pool")
    parser.add_argument("--no-netns", action="store_true")
    parser.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if not args.in_netns:
        directory = make_corpus(args.images, args.seed)
        i2d_install()
        if not args.no_netns:
            reexec_in_netns()
    elif not in_isolated_namespace():
        raise SystemExit("--in-netns outside a loopback-only network namespace")
    directory = make_corpus(args.images, args.seed)
    exe = i2d_install()
    files = sorted(directory.glob("*.jpg"))
    megabytes = sum(f.stat().st_size for f in files) / 1e6

    import uvloop

    print(f"machine: {machine()}")
    print(
        f"corpus: {len(files)} JPEGs, {megabytes:.0f} MB, {SIZES[0][0]}x{SIZES[0][1]} to "
        f"{SIZES[1][0]}x{SIZES[1][1]}; output long side {LONG_SIDE}; "
        f"{'isolated loopback-only network namespace' if args.in_netns else 'host network'}"
    )
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    results: dict[str, list[Run]] = {}
    server_cpu: list[float] = []
    with serve_directory(directory, args.servers) as bases:
        servers = [p.pid for p in multiprocessing.active_children() if p.pid is not None]
        base_list = bases.split(",")
        urls = [f"{base_list[i % len(base_list)]}/{f.name}" for i, f in enumerate(files)]
        # img2dataset's fixed cost (interpreter, imports, process pool): a one-image run.
        baseline = i2d_run(exe, urls[:1], args.i2d_threads, args.i2d_shard, 0.0)
        pools = ["process", "thread"] if args.pools else ["process"]
        for run in range(args.runs):
            for pool in pools:
                s0 = proc_cpu(servers)
                result = uvloop.run(imagestream_run(urls, pool))
                server_cpu.append((proc_cpu(servers) - s0) / len(urls))
                results.setdefault(result.name, []).append(result)
                print(f"  run {run + 1}: {result.name}: {result.rate:.1f} images/s", flush=True)
            s0 = proc_cpu(servers)
            result = i2d_run(exe, urls, args.i2d_threads, args.i2d_shard, megabytes)
            server_cpu.append((proc_cpu(servers) - s0) / len(urls))
            result.cpu_s -= baseline.cpu_s
            results.setdefault(result.name, []).append(result)
            print(
                f"  run {run + 1}: {result.name}: {result.rate:.1f} images/s ({result.note})",
                flush=True,
            )

    rows = []
    for name, runs in results.items():
        rate = median([r.rate for r in runs])
        rows.append(
            [
                name,
                f"{rate:.1f}",
                f"{median([r.megabytes / r.seconds for r in runs]):.1f}",
                f"{1000 * median([r.cpu_s / r.images for r in runs]):.1f}",
                f"{median([r.seconds for r in runs]):.1f}",
            ]
        )
    print()
    print(table(["contender", "images/s", "MB/s", "CPU ms/image", "seconds"], rows))
    ours = median([r.rate for r in results["imagestream (process pool)"]])
    theirs = median([r.rate for r in results[f"img2dataset (threads {args.i2d_threads})"]])
    print(
        f"\nratio imagestream / img2dataset: {ours / theirs:.2f}x (medians of {args.runs} runs); "
        f"image servers used {1000 * median(server_cpu):.1f} ms CPU per image; "
        f"img2dataset start-up (one-image run) {baseline.cpu_s:.1f} CPU s, excluded"
    )
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
