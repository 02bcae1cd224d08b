"""The guard against addresses outside loopback, over real sockets and real name
resolution, inside a network namespace that has nothing but loopback.

Fetching http://10.0.0.1/ or http://169.254.169.254/ from the test machine itself would
send a packet to a real private or metadata address if the guard were broken, so this
part runs in a child process started under ``unshare -n -m``: a new network namespace
(only ``lo``, brought up; the host's interfaces and servers are out of reach) and a new
mount namespace in which a test ``hosts`` file is bind-mounted over /etc/hosts, so that
names resolve (through glibc, as in production) to the addresses the cases need. There,
a broken guard shows as ``connection_error`` ("network is unreachable") instead of
``blocked_address``, and no packet can leave.

The child (``python -m tests.test_fetcher_netns CASES_JSON HOSTS_FILE``) checks that it
really is isolated before it connects anywhere, fetches each case with the real
ImageLoader, and prints the outcomes as JSON; the test asserts them.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from PIL import Image

# Content on 127.0.0.2 (allow-listed) is green; on 127.0.0.1 (refused), same port, red.
GOOD = (0, 200, 0)
WRONG = (200, 0, 0)
HOSTS = """\
10.0.0.1 private.test
169.254.169.254 metadata.test
100.64.0.1 cgnat.test
192.168.1.1 home.test
::ffff:10.0.0.1 mapped.test
fd00::1 ula.test
fe80::1 linklocal.test
8.8.8.8 public.test
127.0.0.2 good.test
10.0.0.1 mixed.test
127.0.0.2 mixed.test
127.0.0.1 both.test
127.0.0.2 both.test
127.0.0.2 rebind.test
"""
REBOUND_HOSTS = HOSTS.replace("127.0.0.2 rebind.test", "10.0.0.1 rebind.test")

# (label, URL with {port} for the servers' port, expected outcome). "good" = the image
# from 127.0.0.2; "connection_error" = the guard let it through (a public address) and
# the empty namespace could not route it.
CASES: list[tuple[str, str, str]] = [
    ("allowed", "http://127.0.0.2:{port}/img", "good"),
    ("loopback", "http://127.0.0.1:{port}/img", "blocked_address"),
    ("private 10/8", "http://10.0.0.1:{port}/img", "blocked_address"),
    ("private 172.16/12", "http://172.16.0.1:{port}/img", "blocked_address"),
    ("private 192.168/16", "http://192.168.1.1:{port}/img", "blocked_address"),
    ("metadata", "http://169.254.169.254/latest/meta-data/", "blocked_address"),
    ("oracle metadata", "http://192.0.0.192/opc/v1/", "blocked_address"),
    ("CGNAT", "http://100.64.0.1:{port}/img", "blocked_address"),
    ("multicast", "http://224.0.0.1:{port}/img", "blocked_address"),
    ("broadcast", "http://255.255.255.255:{port}/img", "blocked_address"),
    ("unspecified", "http://0.0.0.0:{port}/img", "blocked_address"),
    ("integer 10.0.0.1", "http://167772161:{port}/img", "blocked_address"),
    ("hex metadata", "http://0xa9fea9fe/img", "blocked_address"),
    ("octal metadata", "http://0251.0376.0251.0376/img", "blocked_address"),
    ("short 10.1", "http://10.1:{port}/img", "blocked_address"),
    ("IPv6 loopback", "http://[::1]:{port}/img", "blocked_address"),
    ("IPv6 ULA", "http://[fd00::1]:{port}/img", "blocked_address"),
    ("IPv6 link-local", "http://[fe80::1%25lo]:{port}/img", "blocked_address"),
    ("IPv6 multicast", "http://[ff02::1]:{port}/img", "blocked_address"),
    ("IPv4-mapped private", "http://[::ffff:10.0.0.1]:{port}/img", "blocked_address"),
    ("IPv4-mapped metadata", "http://[::ffff:a9fe:a9fe]/img", "blocked_address"),
    ("IPv4-compatible", "http://[::10.0.0.1]:{port}/img", "blocked_address"),
    ("6to4 metadata", "http://[2002:a9fe:a9fe::1]/img", "blocked_address"),
    ("NAT64 private", "http://[64:ff9b::a00:1]:{port}/img", "blocked_address"),
    ("name -> private", "http://private.test:{port}/img", "blocked_address"),
    ("name -> metadata", "http://metadata.test/img", "blocked_address"),
    ("name -> CGNAT", "http://cgnat.test:{port}/img", "blocked_address"),
    ("name -> 192.168", "http://home.test:{port}/img", "blocked_address"),
    ("name -> IPv4-mapped", "http://mapped.test:{port}/img", "blocked_address"),
    ("name -> ULA", "http://ula.test:{port}/img", "blocked_address"),
    ("name -> link-local", "http://linklocal.test:{port}/img", "blocked_address"),
    ("name -> allowed", "http://good.test:{port}/img", "good"),
    # Only the checked address is connected to, whatever else the name resolves to.
    ("name -> private + allowed", "http://mixed.test:{port}/img", "good"),
    ("name -> refused + allowed", "http://both.test:{port}/img", "good"),
    ("redirect -> private", "http://127.0.0.2:{port}/to-private", "blocked_address"),
    ("redirect -> metadata name", "http://127.0.0.2:{port}/to-metadata", "blocked_address"),
    ("redirect -> ULA", "http://127.0.0.2:{port}/to-ula", "blocked_address"),
    ("redirect -> hex", "http://127.0.0.2:{port}/to-hex", "blocked_address"),
    # Public addresses pass the guard; with no route out they fail to connect.
    ("public", "http://8.8.8.8:{port}/img", "connection_error"),
    ("public IPv6", "http://[2606:4700:4700::1111]:{port}/img", "connection_error"),
    ("NAT64 public", "http://[64:ff9b::808:808]:{port}/img", "connection_error"),
    ("name -> public", "http://public.test:{port}/img", "connection_error"),
]


def test_guard_in_a_loopback_only_network_namespace(tmp_path: Path) -> None:
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    assert unshare and ip, "this test needs util-linux unshare and iproute2 ip"
    hosts = tmp_path / "hosts"
    hosts.write_text(HOSTS)
    root = Path(__file__).resolve().parents[1]
    script = (
        f'{ip} link set lo up && mount --bind "$1" /etc/hosts && '
        f'exec "$2" -m tests.test_fetcher_netns "$1"'
    )
    proc = subprocess.run(
        [unshare, "--net", "--mount", "sh", "-c", script, "sh", str(hosts), sys.executable],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"namespace run failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    outcomes: dict[str, list[str]] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcomes.pop("isolation") == ["lo"], "the child was not in a loopback-only namespace"
    mismatched = {
        label: outcomes[label] for label, _, expected in CASES if outcomes[label][0] != expected
    }
    assert not mismatched, mismatched
    # Rebinding: a cached (checked) answer keeps its address; a new lookup is checked again.
    assert outcomes["rebind: cached"][0] == "good"
    assert outcomes["rebind: new lookup"][0] == "blocked_address"
    assert outcomes["refused server hits"] == ["0"]


# ------------------------------------------------------------------ the child process


def _png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buffer, "PNG")
    return buffer.getvalue()


def _isolated_interfaces() -> list[str]:
    return sorted(name for _, name in socket.if_nameindex())


async def _child(hosts_file: Path) -> dict[str, list[str]]:
    from imagestream.common.errors import ItemError
    from imagestream.fetcher.loader import ImageLoader
    from imagestream.fetcher.settings import FetcherSettings

    from .fetcher_servers import RawServer, redirect, reply

    good = await RawServer(
        {
            "img": reply(_png(GOOD), content_type="image/png"),
            "to-private": redirect("http://10.0.0.1/img"),
            "to-metadata": redirect("http://metadata.test/latest/"),
            "to-ula": redirect("http://[fd00::1]/img"),
            "to-hex": redirect("http://0xa9fea9fe/img"),
        }
    ).start()
    wrong = await RawServer(
        {"img": reply(_png(WRONG), content_type="image/png")}, host="127.0.0.1", port=good.port
    ).start()
    settings = FetcherSettings(
        fetch_allowed_cidrs=("127.0.0.2/32",),
        fetch_attempts=1,
        fetch_connect_timeout_s=3,
        fetch_total_timeout_s=10,
    )

    async def outcome(loader: ImageLoader, url: str) -> list[str]:
        try:
            prepared = await loader.load(url, 64)
        except ItemError as exc:
            return [exc.error_class.value, exc.message]
        im = Image.open(io.BytesIO(prepared.data)).convert("RGB")
        pixel = im.getpixel((10, 10))
        return ["good" if pixel == GOOD else f"wrong content {pixel}", url]

    results: dict[str, list[str]] = {"isolation": _isolated_interfaces()}
    loader = ImageLoader(settings)
    try:
        for label, template, _ in CASES:
            results[label] = await outcome(loader, template.format(port=good.port))
        # DNS rebinding: the name now points at a private address.
        rebind = f"http://rebind.test:{good.port}/img"
        results["rebind: first"] = await outcome(loader, rebind)
        hosts_file.write_text(REBOUND_HOSTS)
        results["rebind: cached"] = await outcome(loader, rebind)
    finally:
        await loader.close()
    fresh = ImageLoader(settings)
    try:
        results["rebind: new lookup"] = await outcome(fresh, rebind)
    finally:
        await fresh.close()
    results["refused server hits"] = [str(sum(wrong.hits.values()))]
    await good.stop()
    await wrong.stop()
    return results


def _main() -> None:
    hosts_file = Path(sys.argv[1])
    # Refuse to connect anywhere unless this really is the isolated namespace with the
    # test hosts file in place (never write to the real /etc/hosts).
    if _isolated_interfaces() != ["lo"]:
        sys.exit(f"not in a loopback-only network namespace: {_isolated_interfaces()}")
    if Path("/etc/hosts").read_text() != hosts_file.read_text():
        sys.exit("the test hosts file is not mounted over /etc/hosts")
    print(json.dumps(asyncio.run(_child(hosts_file))))


if __name__ == "__main__":
    _main()
