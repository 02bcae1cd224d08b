"""Finished batches written straight into the ledger (no pipeline run), for export tests
and benchmarks: any number of items, every tenth failed, realistic result rows.

Rows are made by PostgreSQL itself (``generate_series``), so a million of them take
seconds. Every image's content is different (sha256 of its id) and has no perceptual hash,
so each is its own near-duplicate group, recorded as the grouper would have. Some input
cells are spreadsheet formulas on purpose: exports must defuse them.
"""

from __future__ import annotations

import uuid

import asyncpg

from imagestream.common import ledger

_NUMBER = {"type": "number"}
#: The analysis fields of the rows, with their types as a provider would declare them.
ANALYSIS_SCHEMA = {
    "brightness": _NUMBER,
    "sharpness": _NUMBER,
    "is_blurry": {"type": "boolean"},
    "faces": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string"}},
    "category": {"type": "string"},
    "dominant_colors": {
        "type": "array",
        "items": {"type": "object", "properties": {"hex": {"type": "string"}, "share": _NUMBER}},
    },
}
ANALYSIS_COLUMNS = tuple(ANALYSIS_SCHEMA)
METADATA_COLUMNS = ("sku", "title")


async def finished_batch(
    pool: asyncpg.Pool, rows: int, *, pipeline: str = "fill", name: str = "synthetic"
) -> uuid.UUID:
    """A completed batch of ``rows`` items (every 10th failed) with their results."""
    batch_id = await ledger.create_batch(
        pool,
        ledger.NewBatch(
            name=name,
            pipeline=pipeline,
            source_name=f"{name}.csv",
            source_format="csv",
            analysis_columns=ANALYSIS_COLUMNS,
            analysis_schema=ANALYSIS_SCHEMA,
        ),
    )
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            """
            INSERT INTO items (batch_id, line, url, url_hash, metadata, state, attempts,
                               error_class, error_message, error_stage, dispatched_at, finished_at)
            SELECT $1, g + 1, 'https://images.example.com/catalog/' || g || '/photo.jpg',
                   decode(md5(g::text), 'hex'),
                   jsonb_build_object(
                       'sku', 'SKU-' || lpad(g::text, 8, '0'),
                       'title', CASE WHEN g % 97 = 0 THEN '=HYPERLINK("http://x.invalid")'
                                     ELSE 'Product photo number ' || g END),
                   CASE WHEN g % 10 = 0 THEN 'failed' ELSE 'succeeded' END, 1,
                   CASE WHEN g % 10 = 0 THEN
                        (ARRAY['not_found', 'timeout', 'not_an_image'])[1 + (g / 10) % 3] END,
                   CASE WHEN g % 10 = 0 THEN 'HTTP 404' END,
                   CASE WHEN g % 10 = 0 THEN 'fetcher' END,
                   now() - interval '1 hour' + g * interval '1 millisecond',
                   now() - interval '1 hour' + g * interval '1 millisecond'
            FROM generate_series(1, $2) AS g
            """,
            batch_id,
            rows,
        )
        await conn.execute(
            """
            INSERT INTO results (item_id, batch_id, width, height, format, mode, bytes, sha256,
                                 analyzer, analysis, input_tokens, output_tokens, cost_usd,
                                 duplicate_group)
            SELECT i.id, i.batch_id, 640 + i.line % 640, 480 + i.line % 480, 'JPEG', 'RGB',
                   20000 + i.line % 90000, sha256(int8send(i.id)), 'local',
                   jsonb_build_object(
                       'brightness', round((i.line % 1000) / 1000.0, 3),
                       'sharpness', round((i.line % 5000) / 3.7, 2),
                       'is_blurry', i.line % 7 = 0,
                       'faces', i.line % 4,
                       'tags', jsonb_build_array('product', CASE WHEN i.line % 3 = 0 THEN 'cat'
                                                                 ELSE 'shoe' END),
                       'category', CASE WHEN i.line % 2 = 0 THEN 'apparel' ELSE 'home' END,
                       'dominant_colors', jsonb_build_array(
                           jsonb_build_object('hex', '#aa3311', 'share', 0.6))),
                   258, 40, 0.0000418, i.id
            FROM items i WHERE i.batch_id = $1 AND i.state = 'succeeded'
            """,
            batch_id,
        )
        await conn.execute(
            """
            UPDATE batches b SET total = c.total, succeeded = c.ok, failed = c.bad,
                   input_tokens = 258 * c.ok, output_tokens = 40 * c.ok,
                   cost_usd = 0.0000418 * c.ok, ingested = true, metadata_columns = $2,
                   state = CASE WHEN c.bad > 0 THEN 'completed_with_errors' ELSE 'completed' END,
                   started_at = now() - interval '1 hour', finished_at = now()
            FROM (SELECT count(*) AS total, count(*) FILTER (WHERE state = 'succeeded') AS ok,
                         count(*) FILTER (WHERE state = 'failed') AS bad
                  FROM items WHERE batch_id = $1) c
            WHERE b.id = $1
            """,
            batch_id,
            list(METADATA_COLUMNS),
        )
    return batch_id
