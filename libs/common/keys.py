"""Every Redis key imagestream uses, in one place.

Key layout (``{p}`` is the prefix, setting ``REDIS_PREFIX``, default ``is``)::

    {p}:stream:batches      stream  api -> ingest: BatchSubmitted (group "ingest")
    {p}:stream:fetch        stream  ingest -> fetcher: FetchTask (group "fetcher")
    {p}:stream:analyze      stream  fetcher -> analyzer: AnalyzeTask (group "analyzer")
    {p}:stream:write        stream  fetcher/analyzer -> writer: ItemResult (group "writer")
    {p}:stream:dead         stream  poison entries of any stage: DeadLetter (no group)
    {p}:blob:{sha256}:{px}  string  the analysis-sized image (JPEG/PNG bytes), TTL BLOB_TTL_S
    {p}:halted              hash    batch id -> "paused" | "cancelled"; stages consult it
    {p}:epoch               string  set by the reconciler; its absence means Redis lost its data
    {p}:alive:{stage}:{id}  string  heartbeat of one service process, TTL a few seconds
    {p}:dispatch:lock       string  short lease: one dispatcher tick at a time across replicas
    {p}:flight:{analyzer}:{profile key}:{model}:{sha256}
                            string  single-flight lease: the one analyzer replica analyzing this
                                    content; the others wait for its analysis_cache row
    {p}:budget:{batch id}   hash    spent / reserved nano-USD of a batch with a budget
    {p}:{provider}:quarantine   hash  short hash of a rejected (401/403) key -> reason; TTL
    {p}:{provider}:q:{project}:{model}:rate     zset    requests admitted in the quota window
                                                        (member "id|tokens", score ms)
    {p}:{provider}:q:{project}:{model}:tokens   string  input tokens of those requests (TPM)
    {p}:{provider}:q:{project}:{model}:pace     string  next evenly-spaced send time, ms (GCRA)
    {p}:{provider}:q:{project}:{model}:day:{d}  string  requests of Pacific day d (RPD), TTL 2 d
    {p}:{provider}:q:{project}:{model}:backoff  string  exists while a 429's retry delay runs (PX)
    {p}:observe:lease       string  short lease: one process collects the deployment-wide gauges
    {p}:duplicates:lease    string  lease: the one writer process grouping near-duplicates
                                    (duplicates.py; the ledger's row lock keeps groups right)
    {p}:{provider}:status   hash    key short hash -> JSON status of that API key (project,
                                    state, quota used/limits), published by analyzers, shown
                                    by the api's system status (see docs/API.md)
    {p}:download:{ticket}   string  a one-time export link of the dashboard (JSON), TTL 60 s

Every stream entry has a single field ``m``: a msgpack-encoded message (see messages.py).
An entry is deleted (XDEL) when it is acknowledged, so a stream's length is exactly the work
waiting in or held by that stage: the in-flight window is the sum of the three work streams.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The single field of every stream entry.
FIELD = b"m"


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "is"

    def stream(self, name: str) -> str:
        return f"{self.prefix}:stream:{name}"

    @property
    def batches(self) -> str:
        return self.stream("batches")

    @property
    def fetch(self) -> str:
        return self.stream("fetch")

    @property
    def analyze(self) -> str:
        return self.stream("analyze")

    @property
    def write(self) -> str:
        return self.stream("write")

    @property
    def dead(self) -> str:
        return self.stream("dead")

    @property
    def work_streams(self) -> tuple[str, str, str]:
        """The streams whose entries are items in flight (the dispatch window)."""
        return (self.fetch, self.analyze, self.write)

    def blob(self, sha256_hex: str, long_side: int) -> str:
        return f"{self.prefix}:blob:{sha256_hex}:{long_side}"

    @property
    def halted(self) -> str:
        return f"{self.prefix}:halted"

    @property
    def epoch(self) -> str:
        return f"{self.prefix}:epoch"

    def alive(self, stage: str, consumer: str) -> str:
        return f"{self.prefix}:alive:{stage}:{consumer}"

    def alive_pattern(self) -> str:
        return f"{self.prefix}:alive:*"

    @property
    def dispatch_lock(self) -> str:
        return f"{self.prefix}:dispatch:lock"

    def flight(self, analyzer: str, profile_key: str, model: str, sha256_hex: str) -> str:
        return f"{self.prefix}:flight:{analyzer}:{profile_key}:{model}:{sha256_hex}"

    def budget(self, batch_id: str) -> str:
        return f"{self.prefix}:budget:{batch_id}"

    def quarantine(self, provider: str) -> str:
        return f"{self.prefix}:{provider}:quarantine"

    def quota(self, provider: str, project: str, model: str) -> str:
        """Base of the quota keys of one (provider, project or endpoint, model): append
        ``:rate``, ``:tokens``..."""
        return f"{self.prefix}:{provider}:q:{project}:{model}"

    @property
    def observe_lease(self) -> str:
        return f"{self.prefix}:observe:lease"

    @property
    def duplicates_lease(self) -> str:
        return f"{self.prefix}:duplicates:lease"

    def key_status(self, provider: str) -> str:
        return f"{self.prefix}:{provider}:status"

    def download(self, ticket: str) -> str:
        return f"{self.prefix}:download:{ticket}"


#: Consumer group of each stream, named after the stage that consumes it.
GROUPS: dict[str, str] = {
    "batches": "ingest",
    "fetch": "fetcher",
    "analyze": "analyzer",
    "write": "writer",
}
