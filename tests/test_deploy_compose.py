"""docker-compose.yml, the Dockerfile and the Prometheus/Grafana files, checked statically
(no Docker engine here): every service's image, command, environment, healthcheck and
start order; no secret in the files; every path they mount or copy exists; the image
installs the locked dependencies as a non-root user.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from imagestream.cli import pipeline

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("api", "ingest", "fetcher", "analyzer", "writer")
PORTS = {"api": 5001} | {s: pipeline.STAGES[s].metrics_port for s in STAGES if s != "api"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY")
INTERPOLATION = re.compile(r"^\$\{[A-Z_]+(:?[-?][^}]*)?\}$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def grace_of(period: str) -> float:
    match = re.fullmatch(r"(\d+)s", period)
    assert match, period
    return float(match.group(1))


def test_services_and_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {*STAGES, "migrate", "redis", "postgres", "prometheus", "grafana"}
    for name in (*STAGES, "migrate"):
        service = services[name]
        assert service["build"] == "." and service["image"] == "imagestream:local", name
        assert service["command"] == (["db", "migrate"] if name == "migrate" else ["serve", name])
        env = service["environment"]
        assert env["REDIS_URL"] == "redis://redis:6379/0"
        assert env["DATABASE_URL"].startswith("postgresql://imagestream:${POSTGRES_PASSWORD")
        assert env["DATABASE_URL"].endswith("@postgres:5432/imagestream")
        depends = service["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy", name
        assert depends["postgres"]["condition"] == "service_healthy", name
        if name != "migrate":
            assert depends["migrate"]["condition"] == "service_completed_successfully", name
            # Docker kills after the grace period: it must outlast the drain.
            assert grace_of(service["stop_grace_period"]) > float(env["SHUTDOWN_GRACE_S"])
            assert service["read_only"] is True and "/tmp" in service["tmpfs"], name
            assert service["cap_drop"] == ["ALL"], name
    assert services["migrate"]["restart"] == "no"
    assert services["fetcher"]["deploy"]["replicas"] == 2
    assert "5001:5001" in services["api"]["ports"]
    assert "3000:3000" in services["grafana"]["ports"]
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_healthchecks_probe_each_service(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        if name == "migrate":
            assert "healthcheck" not in service  # a job: its exit status is what counts
            continue
        test = service["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL"), name
        if name in STAGES:
            assert f"http://127.0.0.1:{PORTS[name]}/readyz" in " ".join(test), name
    redis_command = services["redis"]["command"]
    assert redis_command[redis_command.index("--appendonly") + 1] == "yes"
    assert redis_command[redis_command.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(v.startswith("postgres-data:") for v in services["postgres"]["volumes"])


def _strings(value: Any) -> list[tuple[str, str]]:
    """Every (key, string) pair in a parsed YAML tree."""
    found: list[tuple[str, str]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, str):
                found.append((str(key), item))
            else:
                found += _strings(item)
    elif isinstance(value, list):
        for item in value:
            found += _strings(item)
    return found


def test_no_secret_literals(compose: dict[str, Any]) -> None:
    for key, value in _strings(compose["services"]):
        if SECRET_NAME.search(key):
            assert value == "" or INTERPOLATION.match(value), f"{key} holds a literal"
        for url in re.findall(r"\w+://[^\s\"']+", value):
            userinfo = url.split("://", 1)[1].split("@")[0] if "@" in url else ""
            password = userinfo.partition(":")[2]
            assert not password or INTERPOLATION.match(password), f"{key}: password in {url}"
    example = (ROOT / "deploy" / "compose.env.example").read_text()
    for line in example.splitlines():
        if "=" in line and not line.startswith("#"):
            name, _, value = line.partition("=")
            assert not SECRET_NAME.search(name) or value == "", f"{name} has a value"


def test_mounted_files_exist_and_agree(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source}"
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    scraped: dict[str, int] = {}
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for host in sd["names"]:
                scraped[host] = sd["port"]
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, port = target.partition(":")
                scraped[host] = int(port)
    for stage in STAGES:
        assert scraped.get(stage) == PORTS[stage], stage
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    datasource = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/imagestream.json").read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])} | {
        p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p
    }
    assert uids == {datasource["uid"]}
    provider = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/imagestream.yml").read_text()
    )["providers"][0]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in services["grafana"]["volumes"]}
    assert (ROOT / mounted[provider["options"]["path"]] / "imagestream.json").is_file()


def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.MULTILINE)
    assert len(stages) >= 3, "multi-stage: build and runtime apart"
    final = text[text.rindex("\nFROM ") :]
    assert "uv sync --frozen --no-dev" in text, "installs the locked dependencies only"
    assert "COPY --from=build /opt/imagestream /opt/imagestream" in final
    user = re.search(r"^USER\s+(\S+)", final, re.MULTILINE)
    assert user and user.group(1).split(":")[0] not in ("0", "root"), "runs as non-root"
    assert 'ENTRYPOINT ["imagestream"]' in final
    assert "build-essential" not in final, "no toolchain in the runtime image"
    # Everything the build copies exists, and the packages' folders are all copied.
    copied = re.findall(r"^COPY\s+(?!--from)(.+)\s+\S+$", text, re.MULTILINE)
    sources = [s for line in copied for s in line.split()]
    for source in sources:
        assert (ROOT / source).exists(), source
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for folder in project["tool"]["setuptools"]["package-dir"].values():
        assert any(folder == s or folder.startswith(s.rstrip("/") + "/") for s in sources), folder
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignore = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", "the context is an allow-list"
    for source in sources:
        assert f"!{source}" in ignore or f"!{source}/" in ignore, source
