"""The request path's shortcuts equal what they replaced (issue #19: each was found by counting
a request's instructions with ``tests/benchmarks/instructions.py``).

- request ids: a hex pair from a table per id, the rest formatted once per 256;
- the latency histograms: a scan from the lowest bound instead of ``bisect_left``;
- the upstream request line: ``find`` instead of ``in`` for CR and LF.

The Host field's remembered values are tested with the Host checks (``test_host_security``).
Run on the compiled and on the interpreted build alike (CI runs both).
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from bisect import bisect_left

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sidecar import metrics, responses
from sidecar.http1.upstream import request_head


def test_request_ids_are_32_hex_digits_counted_up_across_the_table() -> None:
    ids = responses._RequestIds("0123456789abcdef")
    made = [ids.next() for _ in range(70_000)]
    assert all(re.fullmatch("0123456789abcdef[0-9a-f]{16}", i) for i in made)
    assert [int(i[16:], 16) for i in made] == list(range(1, 70_001))  # 255, 256, 257 ... 65536


def test_request_ids_differ_between_processes_and_calls() -> None:
    """Each worker is its own process with its own random prefix."""
    code = "from sidecar import responses; print(responses.new_request_id())"
    run = [sys.executable, "-c", code]
    others = {subprocess.run(run, capture_output=True, text=True, check=True).stdout.strip()}
    others.add(subprocess.run(run, capture_output=True, text=True, check=True).stdout.strip())
    here = {responses.new_request_id() for _ in range(1000)}
    assert len(others) == 2 and len(here) == 1000
    assert not others & here
    assert len({i[:16] for i in others | {next(iter(here))}}) == 3


_BOUNDS = metrics._LATENCY_BUCKETS


@settings(max_examples=500, deadline=None, derandomize=True)
@given(
    st.one_of(
        st.floats(min_value=-1.0, max_value=100.0, allow_nan=False),
        st.sampled_from(_BOUNDS),
        st.sampled_from([math.nextafter(b, math.inf) for b in _BOUNDS]),
        st.sampled_from([math.nextafter(b, -math.inf) for b in _BOUNDS]),
        st.just(math.inf),
    )
)
@example(0.0)
@example(30.0)
def test_a_duration_falls_in_the_bucket_bisect_left_finds(seconds: float) -> None:
    """A value equal to a bound belongs to that bound's bucket (``le``), beyond the last to
    +Inf, as prometheus_client counts it."""
    histogram = metrics._Histogram()
    histogram.observe(seconds)
    expected = [0] * (len(_BOUNDS) + 1)
    expected[bisect_left(_BOUNDS, seconds)] = 1
    assert histogram.counts == expected
    assert histogram.total == seconds


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(alphabet=st.sampled_from("/ab?=%\r\n\x00é"), max_size=12))
def test_a_target_with_cr_or_lf_never_becomes_a_request_line(target: str) -> None:
    if "\r" in target or "\n" in target:
        with pytest.raises(ValueError, match="CR or LF"):
            request_head("GET", target, b"", b"localhost")
    else:
        head = request_head("GET", target, b"", b"localhost")
        assert head.count(b"\r\n") == 3 and b"\n" not in head.replace(b"\r\n", b"")
