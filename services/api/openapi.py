"""The OpenAPI 3.1 document of the api, built here beside the code it describes.

tests/test_api_schema.py runs schemathesis against the served document (every response
must match it) and checks that every route of the app is documented and vice versa, so
the two cannot drift apart silently.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from imagestream.common import export, providers, webhooks

from .errors import Handler, bad_request
from .params import BATCH_STATES, ITEM_STATES

VERSION = "1.0.0"
Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    if "type" in schema and isinstance(schema["type"], str):
        return {**schema, "type": [schema["type"], "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


def obj(
    properties: dict[str, Schema], *, required: list[str] | None = None, extra: bool = False
) -> Schema:
    schema: Schema = {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
    }
    if not extra:
        schema["additionalProperties"] = False
    return schema


STRING = {"type": "string"}
INTEGER = {"type": "integer"}
NUMBER = {"type": "number"}
BOOLEAN = {"type": "boolean"}
TIME = {"type": "string", "format": "date-time"}
COUNT = {"type": "integer", "minimum": 0}
ANY_OBJECT: Schema = {"type": "object"}
JSON_VALUE: Schema = {}
STRING_OR_LIST = {"anyOf": [STRING, {"type": "array", "items": STRING}]}

SCHEMAS: dict[str, Schema] = {
    "Error": obj(
        {
            "error": obj(
                {
                    "code": {"type": "string", "description": "Machine-readable, e.g. not_found."},
                    "message": {"type": "string", "description": "One line for people."},
                }
            )
        }
    ),
    "Counts": obj(
        {
            "total": COUNT,
            "succeeded": COUNT,
            "failed": COUNT,
            "skipped": COUNT,
            "cancelled": COUNT,
            "remaining": COUNT,
            "duplicates": COUNT,
            "invalid": COUNT,
        }
    ),
    "Batch": obj(
        {
            "id": {"type": "string", "format": "uuid"},
            "name": STRING,
            "state": {"type": "string", "enum": list(BATCH_STATES)},
            "state_reason": nullable(STRING),
            "analyzer": STRING,
            "profile": nullable(STRING),
            "model": nullable(STRING),
            "source_name": nullable(STRING),
            "source_format": nullable(STRING),
            "list_url": {
                **nullable(STRING),
                "description": "Where the list is read from, if not uploaded (without a"
                " query or user info).",
            },
            "webhook_url": {
                **nullable(STRING),
                "description": "Where the batch's events are POSTed (without a query or"
                " user info); see /webhooks.",
            },
            "ingested": BOOLEAN,
            "counts": ref("Counts"),
            "progress": {"type": "number", "minimum": 0, "maximum": 100},
            "tokens": obj({"input": COUNT, "output": COUNT}),
            "cost_usd": NUMBER,
            "budget_usd": nullable(NUMBER),
            "mode": {"type": "string", "enum": ["standard", "batch"]},
            "created_at": TIME,
            "started_at": nullable(TIME),
            "finished_at": nullable(TIME),
        }
    ),
}
_UUID = {"type": "string", "format": "uuid"}
_ITEM_ID = {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}
_DUPLICATE_GROUP = {
    **_ITEM_ID,
    "description": "Only the members of this near-duplicate group (the id of its first item).",
}
_DUPLICATES = {
    "type": "string",
    "enum": list(export.DUPLICATES),
    "description": "first: only the first item of each near-duplicate group (one image per"
    " group; images without near-duplicates included).",
}
_STRINGS = {"type": "array", "items": STRING}
SCHEMAS["ExportJob"] = obj(
    {
        "id": _UUID,
        "batch_id": _UUID,
        "format": {"type": "string", "enum": list(export.FORMATS)},
        "destination": STRING,
        "filters": obj(
            {
                "state": _STRINGS,
                "error_class": _STRINGS,
                "field": _STRINGS,
                "created_after": nullable(TIME),
                "created_before": nullable(TIME),
                "duplicate_group": nullable(INTEGER),
                "duplicates": nullable({"type": "string", "enum": list(export.DUPLICATES)}),
            }
        ),
        "part_rows": nullable(COUNT),
        "state": {"type": "string", "enum": ["queued", "running", "completed", "failed"]},
        "rows_total": nullable(COUNT),
        "rows_written": COUNT,
        "bytes_written": COUNT,
        "progress": nullable({"type": "number", "minimum": 0, "maximum": 100}),
        "files": _STRINGS,
        "error": nullable(STRING),
        "attempts": COUNT,
        "created_at": TIME,
        "started_at": nullable(TIME),
        "finished_at": nullable(TIME),
    }
)
SCHEMAS["NewExportJob"] = obj(
    {
        "destination": {
            "type": "string",
            "minLength": 1,
            "description": "s3://bucket/key or gs://bucket/key (a bucket of"
            " EXPORT_ALLOWED_BUCKETS), or a path or file:// URL inside EXPORT_DIR (relative"
            " paths are taken from EXPORT_DIR). Ending in '/': part files"
            " part-00000.<suffix>, ... under that prefix.",
        },
        "format": {
            "type": "string",
            "enum": list(export.FORMATS),
            "description": "Default: from the destination's extension.",
        },
        "part_rows": {
            "type": "integer",
            "minimum": 1,
            "maximum": 100_000_000,
            "description": "Rows per Parquet part file under a prefix (default 1,000,000).",
        },
        "state": STRING_OR_LIST,
        "error_class": STRING_OR_LIST,
        "field": STRING_OR_LIST,
        "created_after": TIME,
        "created_before": TIME,
        "duplicate_group": _DUPLICATE_GROUP,
        "duplicates": _DUPLICATES,
    },
    required=["destination"],
)
_BATCH_PROPS: dict[str, Schema] = SCHEMAS["Batch"]["properties"]
SCHEMAS |= {
    "CreatedBatch": obj(
        _BATCH_PROPS
        | {
            "upload_bytes": COUNT,
            "webhook_secret": {
                "type": "string",
                "pattern": "^whsec_",
                "description": "The secret generated to sign this batch's webhooks (none"
                " was sent, and neither the token nor WEBHOOK_SECRET has one): shown this"
                " once.",
            },
        },
        required=[*_BATCH_PROPS, "upload_bytes"],
    ),
    "BatchStatus": obj(
        _BATCH_PROPS
        | {
            "elapsed_s": NUMBER,
            "rate_per_s": {"type": "number", "minimum": 0, "description": "Items/s, last minute."},
            "eta_s": nullable(NUMBER),
            "errors": {
                "type": "object",
                "additionalProperties": COUNT,
                "description": "Failed items by error class.",
            },
            "stages": {
                **obj({"pending": COUNT, "fetching": COUNT, "analyzing": COUNT, "writing": COUNT}),
                "description": "Where the batch's unfinished items are now: pending in the"
                " ledger; in flight by the work stream holding them (fetching: fetch stream,"
                " writing: write stream, analyzing: the other in-flight items).",
            },
        }
    ),
    "BatchPage": obj(
        {
            "batches": {"type": "array", "items": ref("Batch")},
            "total": COUNT,
            "limit": INTEGER,
            "offset": INTEGER,
        }
    ),
    "BatchUpload": {
        "type": "object",
        "oneOf": [{"required": ["file"]}, {"required": ["list_url"]}],
        "additionalProperties": False,
        "properties": {
            "file": {
                "type": "string",
                "contentMediaType": "application/octet-stream",
                "description": "The list: CSV (a url column, or URLs first), TXT or JSONL;"
                " may be gzipped.",
            },
            "list_url": {
                "type": "string",
                "maxLength": 4096,
                "description": "Instead of file: the list's s3://, gs:// (a bucket named in"
                " LIST_ALLOWED_BUCKETS) or https:// URL (a public address, or one"
                " LIST_ALLOWED_CIDRS allows), streamed by ingest with the service's"
                " credentials.",
            },
            "batch_name": {"type": "string", "maxLength": 200},
            "name": {"type": "string", "maxLength": 200, "description": "Alias of batch_name."},
            "webhook_url": {
                "type": "string",
                "maxLength": 2000,
                "description": "POST the batch's events here (batch.completed, batch.failed,"
                " batch.paused, batch.cancelled, export.completed), signed as Standard"
                " Webhooks; default WEBHOOK_URL. Its host must resolve to public addresses"
                " (or a range of WEBHOOK_ALLOWED_CIDRS).",
            },
            "webhook_secret": {
                "type": "string",
                "pattern": "^whsec_",
                "description": "whsec_ + base64 key signing the events; default: the"
                " token's, else WEBHOOK_SECRET, else a new one returned once.",
            },
            "analyzer": {"type": "string", "enum": list(providers.names())},
            "profile": {
                "type": "string",
                "maxLength": 200,
                "description": "The analysis profile. local: facts (the default: pixel facts)"
                " or content (facts + text read by OCR + NSFW scores; analysis image"
                " long side 1280 unless long_side names one). gemini, openai: describe"
                " (the default), moderation, or a profile of PROFILES_DIR.",
            },
            "model": {"type": "string", "maxLength": 200},
            "budget_usd": {
                "type": "string",
                "description": "US dollars, > 0: the batch pauses before exceeding it.",
            },
            "cache": {
                "type": "string",
                "enum": ["true", "false"],
                "description": "false: analyze every image again, even if its content was"
                " analyzed before with the same profile and model.",
            },
            "long_side": {
                "type": "string",
                "description": "Long side in pixels (32-4096) of the image handed to the"
                " analyzer; default the profile's (local content: 1280), else"
                " ANALYSIS_LONG_SIDE (768).",
            },
            "mode": {
                "type": "string",
                "enum": ["standard", "batch"],
                "description": "batch: the images go through the provider's Batch API at"
                " half the price, answered within hours instead of seconds (analyzers: "
                + ", ".join(s.name for s in providers.registry().values() if "batch" in s.modes)
                + ").",
            },
        },
    },
    "ControlResult": obj({"id": {"type": "string", "format": "uuid"}, "state": STRING}),
    "ReplayRequest": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "error_class": STRING_OR_LIST,
            "stage": {**STRING_OR_LIST, "description": "fetcher, analyzer, writer..."},
        },
    },
    "ReplayResult": obj(
        {"id": {"type": "string", "format": "uuid"}, "replayed": COUNT, "state": STRING}
    ),
    "Deleted": obj({"id": {"type": "string", "format": "uuid"}, "deleted": BOOLEAN}),
    "Item": obj(
        {
            "id": INTEGER,
            "line": INTEGER,
            "url": STRING,
            "state": {"type": "string", "enum": list(ITEM_STATES)},
            "attempts": INTEGER,
            "error_class": nullable(STRING),
            "error_message": nullable(STRING),
            "error_stage": nullable(STRING),
            "metadata": nullable(ANY_OBJECT),
            "width": nullable(INTEGER),
            "height": nullable(INTEGER),
            "format": nullable(STRING),
            "bytes": nullable(INTEGER),
            "cost_usd": nullable(NUMBER),
            "finished_at": nullable(TIME),
        }
    ),
    "ItemPage": obj(
        {
            "items": {"type": "array", "items": ref("Item")},
            "limit": INTEGER,
            "next_after": {
                **nullable(INTEGER),
                "description": "Pass as `after` for the next page.",
            },
        }
    ),
    "ItemResult": obj(
        {
            "width": INTEGER,
            "height": INTEGER,
            "format": STRING,
            "mode": nullable(STRING),
            "bytes": INTEGER,
            "sha256": STRING,
            "frames": INTEGER,
            "exif": nullable(ANY_OBJECT),
            "analyzer": STRING,
            "model": nullable(STRING),
            "analysis": nullable(ANY_OBJECT),
            "tokens": obj(
                {"input": INTEGER, "output": INTEGER, "thought": INTEGER, "cached": INTEGER}
            ),
            "cost_usd": NUMBER,
            "cache_hit": BOOLEAN,
            "duplicate_group": {
                **nullable(INTEGER),
                "description": "The id of the first item of its near-duplicate group (its"
                " own id when it has none); null until grouped.",
            },
            "created_at": TIME,
        }
    ),
    "ItemDetail": obj(
        {
            "id": INTEGER,
            "batch_id": {"type": "string", "format": "uuid"},
            "line": INTEGER,
            "url": STRING,
            "state": {"type": "string", "enum": list(ITEM_STATES)},
            "attempts": INTEGER,
            "error_class": nullable(STRING),
            "error_message": nullable(STRING),
            "error_stage": nullable(STRING),
            "metadata": nullable(ANY_OBJECT),
            "dispatched_at": nullable(TIME),
            "finished_at": nullable(TIME),
            "result": nullable(ref("ItemResult")),
            "history": {
                "type": "array",
                "description": "Every failure the item met, oldest first (replays included).",
                "items": obj(
                    {
                        "stage": STRING,
                        "error_class": STRING,
                        "message": nullable(STRING),
                        "at": TIME,
                    }
                ),
            },
        }
    ),
    "DuplicateGroups": obj(
        {
            "max_distance": {
                **nullable(INTEGER),
                "description": "Bits two perceptual hashes may differ by in one group (null:"
                " not grouped yet).",
            },
            "groups": {**COUNT, "description": "Groups of two or more items."},
            "items": {**COUNT, "description": "Items in those groups."},
            "pending": {**COUNT, "description": "Succeeded items not grouped yet."},
            "duplicate_groups": {
                "type": "array",
                "items": obj(
                    {
                        "group": {**INTEGER, "description": "The id of its first item."},
                        "size": COUNT,
                        "members": {
                            "type": "array",
                            "items": obj(
                                {
                                    "item_id": INTEGER,
                                    "url": STRING,
                                    "width": INTEGER,
                                    "height": INTEGER,
                                    "format": STRING,
                                }
                            ),
                        },
                    }
                ),
            },
            "limit": INTEGER,
            "next_after": {
                **nullable(INTEGER),
                "description": "Pass as `after` for the next page.",
            },
        }
    ),
    "RejectPage": obj(
        {
            "rejects": {
                "type": "array",
                "items": obj({"line": INTEGER, "reason": STRING, "raw": nullable(STRING)}),
            },
            "total": COUNT,
            "limit": INTEGER,
            "next_after": nullable(INTEGER),
        }
    ),
    "DownloadRequest": obj(
        {
            "path": {
                "type": "string",
                "description": "A results, rejects or export path with its query, e.g."
                " /api/v1/batches/{id}/results?format=xlsx&state=failed",
            }
        }
    ),
    "Download": obj(
        {
            "url": {"type": "string", "description": "GET it once within expires_in_s."},
            "expires_in_s": INTEGER,
        }
    ),
    "Session": obj(
        {
            "id": INTEGER,
            "name": STRING,
            "role": {"type": "string", "enum": ["admin", "viewer"]},
            "auth_disabled": BOOLEAN,
        }
    ),
    "Check": {
        "type": "object",
        "required": ["ok"],
        "properties": {"ok": BOOLEAN, "latency_ms": NUMBER, "error": STRING},
    },
    "Ready": obj(
        {"ready": BOOLEAN, "checks": obj({"redis": ref("Check"), "postgres": ref("Check")})}
    ),
    "Health": obj({"status": {"type": "string", "enum": ["ok"]}}),
    "Stage": obj(
        {
            "stage": STRING,
            "stream": STRING,
            "entries": COUNT,
            "pending": COUNT,
            "lag": COUNT,
            "consumers": COUNT,
            "services": COUNT,
            "inflight": COUNT,
            "capacity": COUNT,
            "oldest_pending_age_s": NUMBER,
            "oldest_waiting_age_s": NUMBER,
            "throughput_per_s": {
                **nullable(NUMBER),
                "description": "Entries/s into the stage's stream (Redis 7+).",
            },
        }
    ),
    "Service": obj(
        {
            "stage": STRING,
            "consumer": STRING,
            "inflight": INTEGER,
            "capacity": INTEGER,
            "up_s": NUMBER,
            "seen_s_ago": NUMBER,
        }
    ),
    "Pipeline": {
        "type": "object",
        "required": ["ok"],
        "properties": {
            "ok": BOOLEAN,
            "error": STRING,
            "stages": {"type": "array", "items": ref("Stage")},
            "services": {"type": "array", "items": ref("Service")},
            "dead_entries": COUNT,
            "redis_memory_bytes": COUNT,
            "taken_at": TIME,
        },
    },
    "ProviderKey": {
        "type": "object",
        "required": ["key"],
        "description": "As published by the analyzers; see docs/API.md for the fields.",
        "properties": {
            "key": {"type": "string", "description": "Short hash of the key (never the key)."},
            "project": STRING,
            "state": STRING,
        },
    },
    "Provider": {
        "type": "object",
        "required": ["name", "title", "paid", "modes", "keyed"],
        "description": "A registered analyzer; keyed ones add ok, keys and quarantined.",
        "properties": {
            "name": {"type": "string", "enum": list(providers.names())},
            "title": STRING,
            "paid": BOOLEAN,
            "modes": {"type": "array", "items": {"type": "string", "enum": ["standard", "batch"]}},
            "keyed": BOOLEAN,
            "ok": BOOLEAN,
            "error": STRING,
            "keys": {"type": "array", "items": ref("ProviderKey")},
            "quarantined": {
                "type": "array",
                "items": obj({"key": STRING, "reason": STRING, "until": nullable(NUMBER)}),
            },
        },
    },
    "System": obj(
        {
            "redis": {**ref("Check"), "description": "Plus version, uptime_s, used_memory_bytes."},
            "postgres": {**ref("Check"), "description": "Plus version, database_bytes."},
            "pipeline": ref("Pipeline"),
            "ledger": nullable(
                obj(
                    {
                        "batches_by_state": {"type": "object", "additionalProperties": COUNT},
                        "active_items": {"type": "object", "additionalProperties": COUNT},
                        "active_cost_usd": NUMBER,
                        "budget_used_max_ratio": NUMBER,
                    }
                )
            ),
            "providers": {"type": "array", "items": ref("Provider")},
        }
    ),
    "DeadEntry": {
        "type": "object",
        "required": ["id", "at", "stage", "reason", "message"],
        "properties": {
            "id": STRING,
            "at": TIME,
            "stream": STRING,
            "stage": nullable(STRING),
            "deliveries": INTEGER,
            "reason": STRING,
            "message": nullable(
                obj(
                    {
                        "type": STRING,
                        "batch_id": STRING,
                        "item_id": nullable(INTEGER),
                        "url": nullable(STRING),
                    }
                )
            ),
        },
    },
    "DeadPage": obj(
        {
            "entries": {"type": "array", "items": ref("DeadEntry")},
            "total": COUNT,
            "limit": INTEGER,
            "next_after": nullable(STRING),
        }
    ),
    "DeadReplayRequest": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "ids": {"type": "array", "items": STRING},
            "all": {
                "type": "boolean",
                "description": "Replay every entry (up to 10,000 per call).",
            },
        },
    },
    "DeadReplayResult": obj(
        {
            "replayed": COUNT,
            "dropped": {**COUNT, "description": "Entries whose item was no longer failed."},
            "skipped": {"type": "array", "items": obj({"id": STRING, "reason": STRING})},
            "remaining": COUNT,
        }
    ),
    "DeadDiscardRequest": obj({"ids": {"type": "array", "items": STRING, "minItems": 1}}),
    "Discarded": obj({"discarded": COUNT}),
    "Token": obj(
        {
            "id": INTEGER,
            "name": STRING,
            "role": {"type": "string", "enum": ["admin", "viewer"]},
            "created_at": TIME,
            "last_used_at": nullable(TIME),
            "revoked_at": nullable(TIME),
            "has_webhook_secret": BOOLEAN,
        }
    ),
    "TokenList": obj({"tokens": {"type": "array", "items": ref("Token")}}),
    "TokenRequest": obj(
        {
            "name": {"type": "string", "minLength": 1, "maxLength": 100},
            "role": {"type": "string", "enum": ["admin", "viewer"]},
            "webhook_secret": {
                "type": "string",
                "pattern": "^whsec_",
                "description": "Signs the webhooks of the batches this token creates"
                " (unless they send their own).",
            },
        },
        required=["name", "role"],
    ),
    "TokenCreated": obj(
        {
            "id": INTEGER,
            "name": STRING,
            "role": {"type": "string", "enum": ["admin", "viewer"]},
            "token": {"type": "string", "description": "The secret, shown this once."},
        }
    ),
    "TokenRevoked": obj({"id": INTEGER, "revoked": BOOLEAN}),
    "WebhookEvent": obj(
        {
            "id": INTEGER,
            "webhook_id": {
                "type": "string",
                "description": "The webhook-id header: the same on every attempt.",
            },
            "type": {"type": "string", "enum": list(webhooks.EVENT_TYPES)},
            "state": {"type": "string", "enum": ["pending", "delivered", "failed"]},
            "attempts": COUNT,
            "next_attempt_at": nullable(TIME),
            "last_error": nullable(STRING),
            "created_at": TIME,
            "finished_at": nullable(TIME),
            "payload": {
                **obj({"type": STRING, "timestamp": TIME, "data": ANY_OBJECT}),
                "description": "The body POSTed: {type, timestamp, data: {batch_id, name,"
                " state, reason, counts, cost_usd, ...}} (export.completed: and export).",
            },
            "deliveries": {
                "type": "array",
                "items": obj(
                    {
                        "at": TIME,
                        "duration_s": {"type": "number", "minimum": 0},
                        "status": nullable(INTEGER),
                        "error": nullable(STRING),
                    }
                ),
                "description": "Every attempt, oldest first: the HTTP status, or the error.",
            },
        }
    ),
}

ERROR_TEXT = {
    400: "Bad input; the message says which.",
    401: "Missing, invalid or revoked token.",
    403: "The token's role may not do this.",
    404: "No such batch, item, token or link.",
    409: "The batch is not in a state that allows this.",
    413: "The upload is larger than MAX_UPLOAD_BYTES.",
    415: "Not multipart/form-data, or the file is not a CSV/TXT/JSONL list.",
    503: "Redis or PostgreSQL does not answer.",
}


def json_content(schema: Schema) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def errors(*statuses: int) -> dict[str, Any]:
    return {
        str(s): {"description": ERROR_TEXT[s], "content": json_content(ref("Error"))}
        for s in statuses
    }


def ok(schema: Schema, description: str = "OK", status: int = 200) -> dict[str, Any]:
    return {str(status): {"description": description, "content": json_content(schema)}}


def operation(
    summary: str,
    responses: dict[str, Any],
    *,
    role: str | None = "viewer",
    parameters: list[Schema] | None = None,
    body: dict[str, Any] | None = None,
    tag: str = "batches",
    description: str | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": dict(responses)}
    if description:
        op["description"] = description
    if role is None:
        op["security"] = []
    else:
        op["responses"] |= errors(401, 403) if role == "admin" else errors(401)
        op["x-role"] = role
    if parameters:
        op["parameters"] = parameters
    if body:
        op["requestBody"] = body
    op["operationId"] = summary.lower().replace(" ", "_").replace("'", "").replace(",", "")
    return op


def query(name: str, schema: Schema, description: str, *, explode: bool = True) -> Schema:
    param: Schema = {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }
    if schema.get("type") == "array":
        param |= {"style": "form", "explode": explode}
    return param


def path_integer(name: str) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "integer"}}


BATCH_ID = {
    "name": "batch_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "format": "uuid"},
}
LIMIT = query(
    "limit", {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}, "Page size."
)


def _paging(maximum: int, default: int) -> list[Schema]:
    return [
        query(
            "limit",
            {"type": "integer", "minimum": 1, "maximum": maximum, "default": default},
            "Page size.",
        ),
        query(
            "after",
            {"type": "integer", "minimum": 0, "maximum": 2**62},
            "Input line to continue after (the previous page's next_after).",
        ),
    ]


EXPORT_MEDIA = {
    sink.media_type.partition(";")[0]: {"schema": sink.openapi_schema}
    for sink in export.SINKS.values()
}
EXPORT_PARAMS = [
    query(
        "format",
        {"type": "string", "enum": list(export.FORMATS), "default": export.DEFAULT_FORMAT},
        "File format.",
    ),
    query(
        "state",
        {"type": "array", "items": {"type": "string", "enum": list(ITEM_STATES)}},
        "Only items in these states.",
    ),
    query(
        "error_class", {"type": "array", "items": STRING}, "Only items failed with these classes."
    ),
    query(
        "field",
        {
            "type": "array",
            "items": {
                "type": "string",
                "pattern": r"^[^:]+:(" + "|".join(export.OPERATORS) + r")(:.*)?$",
            },
        },
        "Field conditions `<field>:<op>:<value>` on analysis fields (or `input.<column>`);"
        " ops: eq, ne, contains (text or list, case-insensitive), gt, gte, lt, lte, exists."
        " Example: `tags:contains:cat`.",
    ),
    query(
        "created_after", {"type": "string", "format": "date-time"}, "Outcome recorded at or after."
    ),
    query("created_before", {"type": "string", "format": "date-time"}, "Outcome recorded before."),
    query("duplicate_group", _ITEM_ID, str(_DUPLICATE_GROUP["description"])),
    query("duplicates", _DUPLICATES, str(_DUPLICATES["description"])),
]
EXPORT_RESPONSES = {
    "200": {
        "description": "The file, streamed (one row per item; see docs/API.md for the columns).",
        "headers": {"Content-Disposition": {"schema": {"type": "string"}}},
        "content": EXPORT_MEDIA,
    },
    **errors(400, 404),
}


def _control(verb: str, description: str) -> dict[str, Any]:
    return {
        "post": operation(
            f"{verb.capitalize()} a batch",
            ok(ref("ControlResult")) | errors(404, 409),
            role="admin",
            parameters=[BATCH_ID],
            description=description,
        )
    }


def build() -> dict[str, Any]:
    one = "/api/v1/batches/{batch_id}"
    paths: dict[str, Any] = {
        "/api/v1/batches": {
            "post": operation(
                "Create a batch",
                ok(ref("CreatedBatch"), "Created: the list is stored and queued for ingest.", 201)
                | errors(400, 404, 413, 415),
                role="admin",
                body={
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": ref("BatchUpload"),
                            "encoding": {"file": {"contentType": "application/octet-stream"}},
                        }
                    },
                },
                description="Upload a list (streamed; at most MAX_UPLOAD_BYTES, default 2 GiB),"
                " or name its URL in list_url. The old system's form (file + batch_name)"
                " works unchanged. Rows are validated by ingest; invalid ones are listed"
                " under /rejects.",
            ),
            "get": operation(
                "List batches",
                ok(ref("BatchPage")) | errors(400),
                parameters=[
                    LIMIT,
                    query(
                        "offset",
                        {"type": "integer", "minimum": 0, "maximum": 10_000_000, "default": 0},
                        "Skip this many.",
                    ),
                    query(
                        "state",
                        {"type": "array", "items": {"type": "string", "enum": list(BATCH_STATES)}},
                        "Only batches in these states.",
                    ),
                    query(
                        "q",
                        {"type": "string", "maxLength": 200},
                        "Only batches whose name contains this.",
                    ),
                ],
            ),
        },
        one: {
            "get": operation("Get a batch", ok(ref("Batch")) | errors(404), parameters=[BATCH_ID]),
            "delete": operation(
                "Delete a batch",
                ok(ref("Deleted")) | errors(404, 409),
                role="admin",
                parameters=[BATCH_ID],
                description="Deletes a finished batch with its items, results, failures and"
                " rejects. An active batch answers 409: cancel it first.",
            ),
        },
        f"{one}/status": {
            "get": operation(
                "Batch status",
                ok(ref("BatchStatus")) | errors(404),
                parameters=[BATCH_ID],
                description="Counts, progress, rate over the last minute, ETA, cost so far and"
                " errors by class.",
            )
        },
        f"{one}/events": {
            "get": operation(
                "Live progress events",
                {
                    "200": {
                        "description": "Server-sent events: `status` (a BatchStatus),"
                        " `pipeline` (the stages), and `end` once the batch has finished,"
                        " then the stream closes.",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **errors(404),
                },
                parameters=[BATCH_ID],
            )
        },
        f"{one}/pause": _control("pause", "Stops dispatching at once; work in flight finishes."),
        f"{one}/resume": _control("resume", "Continues where the batch stopped."),
        f"{one}/cancel": _control(
            "cancel", "Pending items are cancelled; in-flight ones as they arrive."
        ),
        f"{one}/replay": {
            "post": operation(
                "Replay failed items",
                ok(ref("ReplayResult")) | errors(400, 404, 409),
                role="admin",
                parameters=[BATCH_ID],
                body={"required": False, "content": json_content(ref("ReplayRequest"))},
                description="Puts failed items (optionally only these error classes or stages)"
                " back through the pipeline.",
            )
        },
        f"{one}/items": {
            "get": operation(
                "List items",
                ok(ref("ItemPage")) | errors(400, 404),
                parameters=[
                    BATCH_ID,
                    *_paging(1000, 100),
                    query(
                        "state",
                        {"type": "array", "items": {"type": "string", "enum": list(ITEM_STATES)}},
                        "Only these states.",
                    ),
                    query(
                        "error_class",
                        {"type": "array", "items": STRING},
                        "Only these error classes.",
                    ),
                ],
            )
        },
        f"{one}/items/{{item_id}}": {
            "get": operation(
                "Get an item",
                ok(ref("ItemDetail")) | errors(404),
                parameters=[
                    BATCH_ID,
                    path_integer("item_id"),
                ],
                description="The item, its result and its failure history.",
            )
        },
        f"{one}/rejects": {
            "get": operation(
                "Validation report",
                {
                    "200": {
                        "description": "Input rows refused by ingest (line, reason, raw text).",
                        "content": {
                            "application/json": {"schema": ref("RejectPage")},
                            "text/csv": {"schema": STRING},
                        },
                    },
                    **errors(400, 404),
                },
                parameters=[
                    BATCH_ID,
                    query(
                        "format",
                        {"type": "string", "enum": ["json", "csv"], "default": "json"},
                        "json pages, or the whole report as CSV.",
                    ),
                    *_paging(1000, 100),
                ],
            )
        },
        f"{one}/duplicates": {
            "get": operation(
                "Near-duplicate groups",
                ok(ref("DuplicateGroups")) | errors(400, 404),
                parameters=[
                    BATCH_ID,
                    query(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": 500, "default": 50},
                        "Groups per page.",
                    ),
                    query(
                        "after",
                        {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
                        "Group to continue after (the previous page's next_after).",
                    ),
                    query(
                        "members",
                        {"type": "integer", "minimum": 1, "maximum": 100, "default": 10},
                        "Members listed per group (its first ones); the size counts all.",
                    ),
                ],
                description="The batch's groups of two or more near-duplicate images (perceptual"
                " hashes within max_distance bits, or the same content), in order of their"
                " first item, with their sizes and first members. A finished batch's groups"
                " are complete; a running batch's results of the last seconds may not be"
                " grouped yet (pending). Every member of a group: the results export with"
                " duplicate_group=<group>.",
            )
        },
        f"{one}/results": {
            "get": operation(
                "Export results",
                EXPORT_RESPONSES,
                parameters=[BATCH_ID, *EXPORT_PARAMS],
                tag="exports",
            )
        },
        f"{one}/exports": {
            "post": operation(
                "Start an export job",
                ok(ref("ExportJob"), "Accepted: the job is queued; poll its Location.", 202)
                | errors(400, 404),
                role="admin",
                parameters=[BATCH_ID],
                body={"required": True, "content": json_content(ref("NewExportJob"))},
                tag="exports",
                description="Writes the export in the background, to object storage or a"
                " file, with the filters of the download (state, error_class, field,"
                " created_after, created_before). A job whose api process stops is started"
                " again from its first row by another (or the restarted) api process.",
            ),
            "get": operation(
                "List export jobs",
                ok(obj({"exports": {"type": "array", "items": ref("ExportJob")}, "limit": COUNT}))
                | errors(400, 404),
                parameters=[BATCH_ID, LIMIT],
                tag="exports",
            ),
        },
        f"{one}/webhooks": {
            "get": operation(
                "List webhook events",
                ok(
                    obj(
                        {
                            "webhook_url": nullable(STRING),
                            "events": {"type": "array", "items": ref("WebhookEvent")},
                            "limit": COUNT,
                        }
                    )
                )
                | errors(400, 404),
                parameters=[
                    BATCH_ID,
                    query(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                        "Page size.",
                    ),
                ],
                tag="webhooks",
                description="The batch's events, oldest first, each with its delivery log."
                " Events are delivered at least once, in order per batch, retried with"
                " back-off for WEBHOOK_MAX_AGE_S (a day), then failed.",
            )
        },
        f"{one}/webhooks/{{event_id}}/redeliver": {
            "post": operation(
                "Redeliver a webhook event",
                ok(ref("WebhookEvent"), "Accepted: the event is due now.", 202) | errors(404),
                role="admin",
                parameters=[
                    BATCH_ID,
                    path_integer("event_id"),
                ],
                tag="webhooks",
                description="Sends the event again (delivered or failed ones too; the same"
                " webhook-id), with a fresh WEBHOOK_MAX_AGE_S of retries, from this"
                " deployment.",
            )
        },
        f"{one}/exports/{{export_id}}": {
            "get": operation(
                "Show an export job",
                ok(ref("ExportJob")) | errors(404),
                parameters=[
                    BATCH_ID,
                    {"name": "export_id", "in": "path", "required": True, "schema": _UUID},
                ],
                tag="exports",
                description="State, rows written of rows_total, and the files once completed.",
            )
        },
        "/api/v1/batch-data/export": {
            "get": operation(
                "Export results (old path)",
                EXPORT_RESPONSES,
                parameters=[
                    {
                        "name": "batch_id",
                        "in": "query",
                        "required": True,
                        "schema": {"type": "string", "format": "uuid"},
                    },
                    *EXPORT_PARAMS,
                ],
                tag="exports",
                description="The old system's export path, kept working.",
            )
        },
        "/api/v1/downloads": {
            "post": operation(
                "Create a download link",
                ok(ref("Download"), "A one-time link, valid for 60 s.", 201) | errors(400, 404),
                body={"required": True, "content": json_content(ref("DownloadRequest"))},
                tag="exports",
                description="For browsers: a link that downloads one export or rejects report"
                " without the Authorization header, streamed to disk.",
            )
        },
        "/api/v1/downloads/{ticket}": {
            "get": operation(
                "Use a download link",
                {
                    "200": {
                        "description": "The file.",
                        "headers": {"Content-Disposition": {"schema": {"type": "string"}}},
                        "content": EXPORT_MEDIA,
                    },
                    **errors(400, 404),
                },
                role=None,
                parameters=[{"name": "ticket", "in": "path", "required": True, "schema": STRING}],
                tag="exports",
            )
        },
        "/api/v1/session": {
            "get": operation(
                "Who am I",
                ok(ref("Session")),
                tag="system",
                description="The caller's token name and role.",
            )
        },
        "/api/v1/system": {
            "get": operation(
                "System status",
                ok(ref("System")),
                tag="system",
                description="Services alive, each stage's stream (length, pending, lag,"
                " throughput), the dead stream, Redis and PostgreSQL health, the providers and"
                " their keys.",
            )
        },
        "/api/v1/dead": {
            "get": operation(
                "Dead stream",
                ok(ref("DeadPage")) | errors(400),
                parameters=[
                    query(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": 500, "default": 50},
                        "Page size.",
                    ),
                    query("after", {"type": "string"}, "Entry id to continue after."),
                ],
                tag="system",
            )
        },
        "/api/v1/dead/replay": {
            "post": operation(
                "Replay dead entries",
                ok(ref("DeadReplayResult")) | errors(400),
                role="admin",
                body={"required": True, "content": json_content(ref("DeadReplayRequest"))},
                tag="system",
            )
        },
        "/api/v1/dead/discard": {
            "post": operation(
                "Discard dead entries",
                ok(ref("Discarded")) | errors(400),
                role="admin",
                body={"required": True, "content": json_content(ref("DeadDiscardRequest"))},
                tag="system",
            )
        },
        "/api/v1/tokens": {
            "get": operation("List tokens", ok(ref("TokenList")), role="admin", tag="tokens"),
            "post": operation(
                "Create a token",
                ok(ref("TokenCreated"), "Created; the secret is in the reply, once.", 201)
                | errors(400),
                role="admin",
                body={"required": True, "content": json_content(ref("TokenRequest"))},
                tag="tokens",
            ),
        },
        "/api/v1/tokens/{token_id}": {
            "delete": operation(
                "Revoke a token",
                ok(ref("TokenRevoked")) | errors(404),
                role="admin",
                parameters=[path_integer("token_id")],
                tag="tokens",
            )
        },
        "/api/v1/openapi.json": {
            "get": operation("This document", ok(ANY_OBJECT), role=None, tag="system")
        },
        "/healthz": {"get": operation("Liveness", ok(ref("Health")), role=None, tag="system")},
        "/readyz": {
            "get": operation(
                "Readiness",
                ok(ref("Ready"))
                | {"503": {"description": ERROR_TEXT[503], "content": json_content(ref("Ready"))}},
                role=None,
                tag="system",
            )
        },
        "/metrics": {
            "get": operation(
                "Prometheus metrics",
                {
                    "200": {
                        "description": "Text exposition format.",
                        "content": {"text/plain": {"schema": STRING}},
                    }
                },
                role=None,
                tag="system",
            )
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "imagestream API",
            "version": VERSION,
            "description": "Batches of image URLs: upload, watch, control, replay and export."
            " Send `Authorization: Bearer <token>`: viewer tokens read and export, admin tokens"
            ' also change things. Errors are JSON `{"error": {"code", "message"}}`.',
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "tags": [
            {"name": "batches", "description": "Create, watch and control batches."},
            {"name": "exports", "description": "Results as CSV, JSON, JSONL or XLSX."},
            {"name": "system", "description": "Health, status, the dead stream."},
            {"name": "tokens", "description": "API tokens (admin)."},
            {"name": "webhooks", "description": "A batch's events and their delivery log."},
        ],
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


DOCUMENT = build()
_BODY = orjson.dumps(DOCUMENT)
#: (method, path template) -> the query parameters the document gives that operation.
QUERY_PARAMETERS = {
    (method.upper(), path): frozenset(
        p["name"] for p in operation.get("parameters", []) if p["in"] == "query"
    )
    for path, methods in DOCUMENT["paths"].items()
    for method, operation in methods.items()
}


@web.middleware
async def query_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse query parameters an operation does not take: a typo (``?stat=failed``) would
    otherwise be ignored, and an export would silently hold every row."""
    resource = request.match_info.route.resource
    known = QUERY_PARAMETERS.get((request.method, resource.canonical)) if resource else None
    if known is not None:
        unknown = sorted(set(request.query) - known)
        if unknown:
            takes = ", ".join(sorted(known)) or "none"
            raise bad_request(
                f"unknown query parameter(s) {', '.join(unknown)}; this call takes: {takes}"
            )
    return await handler(request)


async def handler(_: web.Request) -> web.Response:
    return web.Response(
        body=_BODY, content_type="application/json", headers={"Cache-Control": "no-cache"}
    )
