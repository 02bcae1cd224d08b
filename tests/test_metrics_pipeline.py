"""Every metric the Grafana dashboard and the alert rules use is served by the real
services during a real run, and the counters among them moved.

The five services run as separate processes against the real Redis and PostgreSQL; a
small list (images, a 404, a 500) goes in through the api, and one poison entry, held by
a consumer that "died", is claimed and dead-lettered. Then every service's /metrics is
scraped and the PromQL of every dashboard panel and alert rule is checked against it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from imagestream.common import streams, tokens
from imagestream.common.keys import GROUPS, Keys
from imagestream.devtools import corpus
from imagestream.devtools.gemini_server import EmulatorConfig, running_emulator
from imagestream.devtools.imageserver import ImageServer, Reply

from .helpers import wait_for
from .procs import Fleet, free_port, service_env

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "imagestream.json"
RULES = ROOT / "deploy" / "prometheus" / "rules" / "imagestream.yml"
CATALOGUE = ROOT / "docs" / "METRICS.md"
SERVICES = ("api", "ingest", "fetcher", "analyzer", "writer")
#: Families served by the Gemini provider (services/analyzer), checked by their own test.
GEMINI_PREFIXES = ("imagestream_gemini_", "imagestream_analysis_cache_")
#: Counters this run cannot move, and why.
QUIET_COUNTERS = {
    "imagestream_redriven_items_total": "moves only when Redis lost its data or items "
    "stayed in flight past STALE_AFTER_S",
    "imagestream_gemini_thought_tokens_total": "the default profile turns thinking off",
    "imagestream_gemini_cached_tokens_total": "Gemini caches only long repeated prompts",
    "imagestream_provider_keys_quarantined_total": "moves only when a key answers 401/403",
}
#: Series Prometheus makes itself.
BUILTIN = {"up"}
GEMINI_KEY = "metrics-test-key"

# ---------------------------------------------------------------- PromQL names
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^}]*\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_RANGES = re.compile(r"\[[^\]]*\]")
_IDENTIFIER = re.compile(r"(?<![\w.])[a-zA-Z_:][\w:]*")
_KEYWORDS = {"and", "or", "unless", "offset", "bool", "inf", "nan", "by", "without", "on"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, labels, keywords removed)."""
    text = _RANGES.sub("", _GROUPING.sub("", _MATCHERS.sub("", _STRINGS.sub('""', expr))))
    names = set()
    for match in _IDENTIFIER.finditer(text):
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if match.group() not in _KEYWORDS:
            names.add(match.group())
    return names


def expressions() -> dict[str, str]:
    """Every PromQL expression of the dashboard's panels and of the alert rules."""
    found: dict[str, str] = {}
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            found[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            found[f"alert {rule['alert']}"] = rule["expr"]
    return found


def test_promql_name_extraction() -> None:
    expr = (
        'sum by (stage) (rate(imagestream_a_total{outcome=~"x|y"}[5m])) / on (stage) '
        "max(imagestream_b offset 30m) > 0.5 unless absent(imagestream_c_bucket) and up"
    )
    assert metric_names(expr) == {
        "imagestream_a_total",
        "imagestream_b",
        "imagestream_c_bucket",
        "up",
    }
    used = {name for e in expressions().values() for name in metric_names(e)}
    assert len(used) > 30 and all(n.startswith("imagestream_") or n in BUILTIN for n in used)


def test_every_used_metric_is_catalogued() -> None:
    catalogue = CATALOGUE.read_text()
    for where, expr in expressions().items():
        for name in metric_names(expr) - BUILTIN:
            family = re.sub(r"_(bucket|sum|count)$", "", name)
            assert f"`{family}`" in catalogue, f"{where}: {family} is not in docs/METRICS.md"


# ---------------------------------------------------------------- the run
@dataclass
class Scrapes:
    #: service -> exposition text of its last scrape.
    texts: dict[str, str] = field(default_factory=dict)

    def families(self) -> dict[str, str]:
        """Family name -> type, over every service."""
        out = {}
        for text in self.texts.values():
            for family in text_string_to_metric_families(text):
                out[family.name] = family.type
        return out

    def totals(self) -> dict[str, float]:
        """Sample name -> sum over every label set and service."""
        out: dict[str, float] = defaultdict(float)
        for text in self.texts.values():
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    out[sample.name] += sample.value
        return out

    def samples(self, sample_name: str) -> list[tuple[dict[str, str], float]]:
        return [
            (sample.labels, sample.value)
            for text in self.texts.values()
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == sample_name
        ]

    def exporters(self, sample_name: str) -> list[str]:
        return [
            service
            for service, text in self.texts.items()
            if re.search(rf"^{sample_name}[{{ ]", text, re.MULTILINE)
        ]


@dataclass
class Run:
    scrapes: Scrapes
    exit_codes: dict[str, int]
    logs: str


async def scrape(http: aiohttp.ClientSession, ports: dict[str, int]) -> Scrapes:
    result = Scrapes()
    for service, port in ports.items():
        async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
            assert response.status == 200, service
            result.texts[service] = await response.text()
    return result


async def hold_poison_entry(redis: Redis, keys: Keys) -> None:
    """A fetch entry that cannot be decoded, held by a consumer that never comes back:
    the fetcher must claim it after CLAIM_IDLE_MS and send it to the dead stream."""
    ghost = streams.StreamGroup(redis, keys.fetch, GROUPS["fetch"], "ghost-consumer")
    await ghost.ensure()
    await streams.append(redis, keys.fetch, [b"\xc1 not a message"])
    (entry,) = await ghost.read_new(1, 100)
    assert entry.payload is not None


@pytest.fixture(scope="module")
async def run(
    redis_url: str, database_url: str, pool: asyncpg.Pool, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Run]:
    samples = corpus.mixed(12, sizes=((60, 40), (640, 480)), formats=("JPEG", "PNG"), seed=11)
    routes = {s.name: Reply(s.data, content_type=f"image/{s.format.lower()}") for s in samples}
    routes["broken/error.jpg"] = Reply(b"oops", status=500, content_type="text/plain")
    server = ImageServer(routes)
    await server.start()
    listing = io.StringIO()
    writer = csv.writer(listing)
    writer.writerow(["url"])
    for s in samples:
        writer.writerow([server.url(s.name)])
    writer.writerow([server.url("missing/nothing.jpg")])
    writer.writerow([server.url("broken/error.jpg")])

    prefix = f"met{os.getpid()}"
    keys = Keys(prefix)
    redis = Redis.from_url(redis_url)
    logs = tmp_path_factory.mktemp("metrics-services")
    emulator_config = EmulatorConfig(key_projects={GEMINI_KEY: "project-metrics"})
    async with running_emulator(emulator_config) as (_, gemini_url):
        await hold_poison_entry(redis, keys)
        ports = {service: free_port() for service in SERVICES}
        fleets = []
        for service in SERVICES:
            env = service_env(
                redis_url,
                database_url,
                prefix,
                API_PORT=str(ports["api"]),
                METRICS_PORT=str(ports[service]),
                OBSERVE_INTERVAL_S="0.5",
                GEMINI_API_KEYS=GEMINI_KEY,
                GEMINI_BASE_URL=gemini_url,
            )
            fleet = Fleet(env, logs)
            fleet.start(service)
            fleets.append(fleet)
        _, secret = await tokens.create(pool, "metrics-test", "admin")
        base = f"http://127.0.0.1:{ports['api']}"
        try:
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {secret}"}) as http:

                async def all_ready() -> bool:
                    for port in ports.values():
                        try:
                            async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                                if r.status != 200:
                                    return False
                        except aiohttp.ClientError:
                            return False
                    return True

                await wait_for(all_ready, timeout=90, interval=0.2)
                batch_ids = []
                for analyzer in ("local", "gemini"):
                    form = aiohttp.FormData()
                    form.add_field(
                        "file", listing.getvalue(), filename="urls.csv", content_type="text/csv"
                    )
                    form.add_field("analyzer", analyzer)
                    form.add_field("budget_usd", "5")
                    async with http.post(f"{base}/api/v1/batches", data=form) as r:
                        assert r.status == 201, await r.text()
                        batch_ids.append((await r.json())["id"])

                async def finished() -> bool:
                    for batch_id in batch_ids:
                        async with http.get(f"{base}/api/v1/batches/{batch_id}") as r:
                            if (await r.json())["state"] in ("queued", "running"):
                                return False
                    return True

                await wait_for(finished, timeout=120, interval=0.3)

                async def settled() -> Scrapes | None:
                    # The dead letter arrived and the collector has seen the batches finish.
                    result = await scrape(http, ports)
                    finished = sum(
                        value
                        for labels, value in result.samples("imagestream_batches")
                        if labels["state"] in ("completed", "completed_with_errors")
                    )
                    dead = result.totals().get("imagestream_dead_stream_entries", 0)
                    return result if finished >= 2 and dead >= 1 else None

                scrapes = await wait_for(settled, timeout=60, interval=0.5)
        finally:
            codes: dict[str, int] = {}
            for fleet in fleets:
                codes |= fleet.stop_all()
            await server.stop()
            await redis.aclose()
    text = "\n".join(f.logs_text() for f in fleets)
    yield Run(scrapes, codes, text)


def _missing_and_still(run: Run, names: set[str]) -> tuple[list[str], list[str]]:
    families = run.scrapes.families()
    totals = run.scrapes.totals()
    missing, still = [], []
    for name in sorted(names - BUILTIN):
        family = re.sub(r"_(total|bucket|sum|count)$", "", name)
        if name not in totals and family not in families:
            missing.append(name)
            continue
        moved_sample = {"_total": name, "_bucket": f"{family}_count"}.get(name[len(family) :])
        if moved_sample and name not in QUIET_COUNTERS and totals.get(moved_sample, 0) <= 0:
            still.append(name)
    return missing, still


def used_names(gemini: bool) -> set[str]:
    names = {n for e in expressions().values() for n in metric_names(e)}
    return {n for n in names if n.startswith(GEMINI_PREFIXES) == gemini}


async def test_dashboard_and_alert_metrics_are_served(run: Run) -> None:
    missing, still = _missing_and_still(run, used_names(gemini=False))
    assert not missing, f"used by the dashboard or the rules but served by no service: {missing}"
    assert not still, f"counters that did not move during the run: {still}"
    assert all(code == 0 for code in run.exit_codes.values()), run.exit_codes
    assert "Traceback" not in run.logs


async def test_every_served_metric_is_catalogued(run: Run) -> None:
    catalogue = CATALOGUE.read_text()
    served = {
        family + ("_total" if kind == "counter" else "")
        for family, kind in run.scrapes.families().items()
        # prometheus-client's *_created timestamps come as families of their own.
        if family.startswith("imagestream_") and not family.endswith("_created")
    }
    assert len(served) > 30
    missing = sorted(name for name in served if f"`{name}`" not in catalogue)
    assert not missing, f"served but not in docs/METRICS.md: {missing}"


async def test_deployment_gauges_come_from_one_process(run: Run) -> None:
    scrapes = run.scrapes
    # The observe lease: exactly one of the five processes exports the stream gauges.
    assert len(scrapes.exporters("imagestream_stream_entries")) == 1
    assert len(scrapes.exporters("imagestream_redis_up")) == len(SERVICES)
    totals = scrapes.totals()
    assert totals["imagestream_redis_up"] == len(SERVICES)
    assert totals["imagestream_postgres_up"] == len(SERVICES)
    assert totals["imagestream_observer_leader"] == 1
    assert totals["imagestream_dead_stream_entries"] >= 1
    assert totals["imagestream_stage_claimed_total"] >= 1
    # The run is over: nothing waits or is held in any stage.
    assert totals["imagestream_stream_entries"] == 0
    assert totals["imagestream_active_batch_items"] == 0
    assert totals["imagestream_postgres_database_size_bytes"] > 0


async def test_gemini_metrics_are_served(run: Run) -> None:
    missing, still = _missing_and_still(run, used_names(gemini=True))
    assert not missing, f"Gemini metrics used by the dashboard or the rules: {missing}"
    assert not still, f"Gemini counters that did not move: {still}"
