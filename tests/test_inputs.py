"""Reading lists: formats, headers, metadata, validation, gzip, and chunk boundaries."""

from __future__ import annotations

import gzip

import pytest

from imagestream.common.inputs import InputError, ListParser, Reject, Row, normalize_url


def parse(
    data: bytes, name: str | None = None, chunk: int | None = None
) -> tuple[ListParser, list[Row | Reject]]:
    parser = ListParser(filename=name)
    out: list[Row | Reject] = []
    step = chunk or max(1, len(data))
    for i in range(0, len(data), step):
        out += parser.feed(data[i : i + step])
    out += parser.close()
    return parser, out


CSV = (
    b"sku,url,title\r\n"
    b'A1,https://Example.com/a.jpg,"Red, big"\r\n'
    b"A2,ftp://example.com/b.jpg,Blue\r\n"
    b'A3,https://example.com/c.jpg,"two\nlines"\r\n'
    b"A4,https://example.com/a.jpg#frag,dup\r\n"
)


@pytest.mark.parametrize("chunk", [None, 1, 7, 64])
def test_csv_with_url_column_keeps_other_columns_at_any_chunk_size(chunk: int | None) -> None:
    parser, out = parse(CSV, "list.csv", chunk)
    rows = [r for r in out if isinstance(r, Row)]
    rejects = [r for r in out if isinstance(r, Reject)]
    assert parser.format == "csv" and parser.columns == ["sku", "title"]
    assert [r.url for r in rows] == [
        "https://example.com/a.jpg",
        "https://example.com/c.jpg",
        "https://example.com/a.jpg",
    ]
    assert rows[0].metadata == {"sku": "A1", "title": "Red, big"}
    assert rows[1].metadata == {"sku": "A3", "title": "two\nlines"}
    assert rows[0].url_hash == rows[2].url_hash  # duplicates are found by the ledger's key
    assert [(r.line, "ftp" in r.reason) for r in rejects] == [(3, True)]


def test_csv_without_header_takes_urls_from_the_first_column() -> None:
    parser, out = parse(b"http://h/1.png,red\nhttp://h/2.png,blue\n", None)
    assert parser.format == "csv"
    assert [(r.url, r.metadata) for r in out if isinstance(r, Row)] == [
        ("http://h/1.png", {"column_2": "red"}),
        ("http://h/2.png", {"column_2": "blue"}),
    ]


def test_txt_one_url_per_line_with_comments_and_blanks() -> None:
    parser, out = parse(
        b"# my list\nhttp://h/a,b.jpg\n\n  http://h/sp ace.jpg  \nnot a url\n", "x.txt"
    )
    assert parser.format == "txt"
    assert [(r.line, r.url) for r in out if isinstance(r, Row)] == [
        (2, "http://h/a,b.jpg"),
        (4, "http://h/sp%20ace.jpg"),
    ]
    assert [r.line for r in out if isinstance(r, Reject)] == [5]


def test_jsonl_with_metadata_and_bad_lines() -> None:
    data = (
        b'{"url": "https://h/1.jpg", "id": 7}\n{"nourl": 1}\nnot json\n'
        b'{"url": "https://h/2.jpg", "tag": "x"}\n'
    )
    parser, out = parse(data, None, 5)
    assert parser.format == "jsonl" and parser.columns == ["id", "tag"]
    rows = [r for r in out if isinstance(r, Row)]
    assert [(r.line, r.metadata) for r in rows] == [(1, {"id": 7}), (4, {"tag": "x"})]
    assert [r.line for r in out if isinstance(r, Reject)] == [2, 3]


def test_gzip_is_read_transparently() -> None:
    lines = b"".join(b"https://h/%d.jpg\n" % i for i in range(5000))
    _, out = parse(gzip.compress(lines), "urls.txt.gz", 1000)
    assert len(out) == 5000 and all(isinstance(r, Row) for r in out)


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"", "empty"), (b"\x00\x01\x02binary", "binary"), (b"   \n\n", "empty")],
)
def test_unreadable_lists_fail_with_one_clear_line(data: bytes, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse(data, "x.csv")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("HTTPS://EXAMPLE.com:443/a b.jpg?x=1#f", "https://example.com/a%20b.jpg?x=1"),
        ("http://bücher.de/x.png", "http://xn--bcher-kva.de/x.png"),
        ("http://h:8080/", "http://h:8080/"),
        ("http://[::1]:81/x", "http://[::1]:81/x"),
    ],
)
def test_normalize_url(raw: str, expected: str) -> None:
    assert normalize_url(raw) == expected


@pytest.mark.parametrize(
    "raw", ["javascript:alert(1)", "http://", "file:///etc/passwd", "http://h/\x00", "x" * 5000]
)
def test_normalize_url_refuses(raw: str) -> None:
    with pytest.raises(ValueError):
        normalize_url(raw)
