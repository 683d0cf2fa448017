"""The pure rules of file results and uploads: ranges, validators, download headers, display names."""

from __future__ import annotations

import pytest

from asyncjobs import protocol
from asyncjobs.files import sanitize_name

SHA = "ab" * 32


@pytest.mark.parametrize("header, size, expected", [
    ("bytes=0-99", 1000, (0, 99)),
    ("bytes=990-", 1000, (990, 999)),
    ("bytes=-10", 1000, (990, 999)),
    ("bytes=-5000", 1000, (0, 999)),       # a suffix longer than the file is the whole file
    ("bytes=500-5000", 1000, (500, 999)),  # clamped to the end
    ("Bytes = 1-2", 1000, (1, 2)),
    ("bytes=1000-", 1000, None),           # past the end
    ("bytes=5-4", 1000, None),             # reversed
    ("bytes=0-1,3-4", 1000, None),         # multiple
    ("bytes=-0", 1000, None),
    ("bytes=", 1000, None),
    ("bytes=-", 1000, None),
    ("bytes=a-b", 1000, None),
    ("bytes=+1-2", 1000, None),
    ("items=0-1", 1000, None),
    ("bytes=0-", 0, None),                 # nothing to serve from an empty file
])
def test_parse_range(header, size, expected):
    assert protocol.parse_range(header, size) == expected


def test_content_disposition_has_an_ascii_fallback_and_the_exact_name():
    assert protocol.content_disposition("a.txt") == "attachment; filename=\"a.txt\"; filename*=UTF-8''a.txt"
    assert protocol.content_disposition('x"y\\z%.txt') == \
        "attachment; filename=\"x_y_z_.txt\"; filename*=UTF-8''x%22y%5Cz%25.txt"
    assert protocol.content_disposition("日本.mp4") == \
        "attachment; filename=\"__.mp4\"; filename*=UTF-8''%E6%97%A5%E6%9C%AC.mp4"


def answer(**overrides):
    args = dict(sha256=SHA, size=100, name="f.bin", content_type="application/octet-stream", stored_at=0.0,
                method="GET", range_header=None, if_range=None, if_none_match=None)
    return protocol.file_answer(**{**args, **overrides})


def test_file_answer_validators_and_ranges():
    """Whole file 200; one range 206; If-None-Match 304; If-Range by strong ETag or exact date; HEAD whole."""
    whole = answer()
    assert (whole.status, whole.start, whole.length) == (200, 0, 100)
    assert whole.headers["ETag"] == f'"{SHA}"'
    assert whole.headers["Last-Modified"] == "Thu, 01 Jan 1970 00:00:00 GMT"
    assert whole.headers["Repr-Digest"] == "sha-256=:q6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=:"
    part = answer(range_header="bytes=10-19")
    assert (part.status, part.start, part.length) == (206, 10, 10)
    assert part.headers["Content-Range"] == "bytes 10-19/100"
    assert answer(if_none_match=f'"{SHA}"').status == 304
    assert answer(if_none_match='W/"other"').status == 200
    assert answer(range_header="bytes=10-19", if_range=f'"{SHA}"').status == 206
    assert answer(range_header="bytes=10-19", if_range=f'W/"{SHA}"').status == 200  # weak never matches
    assert answer(range_header="bytes=10-19", if_range="Thu, 01 Jan 1970 00:00:00 GMT").status == 206
    assert answer(range_header="bytes=10-19", if_range="Fri, 02 Jan 1970 00:00:00 GMT").status == 200
    bad = answer(range_header="bytes=200-")
    assert bad.status == 416 and bad.headers["Content-Range"] == "bytes */100"
    assert answer(range_header="bytes 10-19").status == 416  # malformed
    other_unit = answer(range_header="items=0-1")  # a unit this server does not know: ignored (RFC 9110, 14.2)
    assert (other_unit.status, other_unit.start, other_unit.length) == (200, 0, 100)
    assert answer(range_header="bytes=10-19", method="HEAD").status == 200


def test_file_answer_preconditions_in_their_order():
    """RFC 9110, 13.2.2: If-Match (strong, or *), else If-Unmodified-Since, fail with 412; If-None-Match, else
    If-Modified-Since, answer 304; an invalid date is ignored."""
    stored, at_stored = 1_000_000.5, "Mon, 12 Jan 1970 13:46:40 GMT"  # Last-Modified: the whole second
    later, earlier = "Mon, 12 Jan 1970 13:46:41 GMT", "Mon, 12 Jan 1970 13:46:39 GMT"
    assert answer(stored_at=stored).headers["Last-Modified"] == at_stored

    def status(**headers):
        return answer(stored_at=stored, **headers).status

    assert status(if_match=f'"{SHA}"') == 200
    assert status(if_match=f'"other", "{SHA}"') == 200
    assert status(if_match="*") == 200
    assert status(if_match='"other"') == 412
    assert status(if_match=f'W/"{SHA}"') == 412  # a weak tag never matches strongly
    assert status(if_unmodified_since=at_stored) == 200
    assert status(if_unmodified_since=earlier) == 412
    assert status(if_unmodified_since="not a date") == 200
    assert status(if_match=f'"{SHA}"', if_unmodified_since=earlier) == 200  # If-Match decides alone
    assert status(if_modified_since=at_stored) == 304
    assert status(if_modified_since=later) == 304
    assert status(if_modified_since=earlier) == 200
    assert status(if_modified_since="yesterday") == 200
    assert status(if_none_match='"other"', if_modified_since=later) == 200  # If-None-Match decides alone
    assert status(if_match='"other"', if_none_match=f'"{SHA}"') == 412  # the 412 comes first
    assert status(if_modified_since=later, range_header="bytes=0-9") == 304


@pytest.mark.parametrize("given, expected", [
    ("clip.mp4", "clip.mp4"),
    ("../../etc/passwd", "passwd"),
    ("C:\\Users\\me\\a.txt", "a.txt"),
    ("a\x00b\nc\td.txt", "abcd.txt"),
    ("\u202egnp.exe", "gnp.exe"),  # a right-to-left override would show it as "exe.png"
    ("a\u2066b\u200fc.txt", "abc.txt"),
    ("", "file"),
    (None, "file"),
    ("dir/", "file"),
    ("  spaced  ", "spaced"),
    ("é" * 200, "é" * 127),  # 255 bytes at most, cut on a character boundary
])
def test_sanitize_name(given, expected):
    assert sanitize_name(given) == expected
