"""Pure rules of many users: RFC 8785 canonical JSON (what counts as equal), the submit token bucket,
and the headers and answers built from them."""

from __future__ import annotations

import pytest

from asyncjobs import codec, protocol
from asyncjobs.limits import SubmitRates
from asyncjobs.queue import equality_key


@pytest.mark.parametrize("value, expected", [
    ({"b": 1, "a": [True, None, "x"]}, '{"a":[true,null,"x"],"b":1}'),
    ({"n": [1.0, 1, -0.0, 1e21, 1e-7, 0.000001, 123.456, 1.5e300]},
     '{"n":[1,1,0,1e+21,1e-7,0.000001,123.456,1.5e+300]}'),
    ({"\u20ac": 1, "\r": 2, "\U0001F600": 3, "\ufb01": 4}, '{"\\r":2,"\u20ac":1,"\U0001F600":3,"\ufb01":4}'),
    ("\u0000\u001f\"\\/é", '"\\u0000\\u001f\\"\\\\/é"'),
])
def test_canonical_json_follows_rfc_8785(value, expected):
    """Keys sorted by UTF-16 code units, ECMAScript number forms, minimal string escapes."""
    assert codec.canonical(value) == expected.encode()


def test_equal_params_have_one_key_whatever_their_form():
    """Key order, white space, escapes and 1 vs 1.0 do not matter; values, types and file digests do."""
    key = equality_key({"a": 1, "b": {"c": [1.0, "x"]}}, {})
    assert key == equality_key(codec.loads(b'{ "b" : {"c":[1e0, "\\u0078"]}, "a":1.0 }'), {})
    assert key != equality_key({"a": "1", "b": {"c": [1, "x"]}}, {})
    assert key != equality_key({"a": 1, "b": {"c": [1, "x"]}}, {"file": "ab" * 32})


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_spends_refills_and_refunds():
    clock = Clock()
    rates = SubmitRates(2.0, 3, clock=clock)
    assert [rates.take("a")[0] for _ in range(3)] == [0.0, 0.0, 0.0]
    wait_s, state = rates.take("a")
    assert wait_s == pytest.approx(0.5)  # nothing spent: a token in half a second
    assert (state.left, state.next_s) == (0, 1)  # said at the moment of the refusal
    assert rates.state("a").left == 0
    clock.now += 0.25
    state = rates.state("a")
    assert (state.left, state.next_s, state.burst, state.window_s) == (0, 1, 3, 2)
    assert rates.take("a")[0] == pytest.approx(0.25)
    rates.refund("a")
    assert rates.take("a")[0] == 0.0
    assert rates.take("b")[0] == 0.0  # every principal has its own bucket
    clock.now += 100
    assert rates.state("a").left == 3 and rates.state("a").next_s == 0  # full, not more


def test_default_burst_is_the_rate_rounded_up_and_at_least_one():
    assert SubmitRates(0.5).burst == 1
    assert SubmitRates(2.5).burst == 3


def test_ratelimit_headers_and_retry_after():
    assert protocol.ratelimit_headers(burst=5, window_s=10, left=2, next_s=1) == {
        "RateLimit-Policy": '"submit";q=5;w=10', "RateLimit": '"submit";r=2;t=1'}
    assert protocol.rate_retry_after_s(0.01) == 1 and protocol.rate_retry_after_s(2.2) == 3


@pytest.mark.parametrize("header, fresh", [
    ("no-cache", True), ("max-age=0, No-Cache", True), ("no-cache=\"x\"", True),
    (None, False), ("no-store", False), ("max-age=0", False),
])
def test_cache_control_no_cache_asks_for_a_fresh_job(header, fresh):
    assert protocol.wants_fresh(header) is fresh
