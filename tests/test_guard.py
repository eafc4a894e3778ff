"""The shared per-record guard: an unexpected exception becomes that record's ``internal_error`` row."""

from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from visinstruct.schemas import Rejection
from visinstruct.schemas.decision import MESSAGE_CHARS
from visinstruct.transforms.guard import INTERNAL_ERROR, guarded, internal_error


def test_a_value_passes_through():
    assert guarded("decode", lambda: 42, "000000001") == 42


def test_an_exception_becomes_an_internal_error_row_naming_its_class():
    def boom():
        raise ZeroDivisionError("division by zero")

    row = guarded("decode", boom, "000000001", "http://example.com/a.jpg")
    assert isinstance(row, Rejection)
    assert (row.stage, row.reason, row.key, row.url) == (
        "decode",
        INTERNAL_ERROR,
        "000000001",
        "http://example.com/a.jpg",
    )
    assert row.message == "ZeroDivisionError: division by zero"
    assert row.detail["exception"] == "ZeroDivisionError"


def test_the_message_is_bounded():
    row = internal_error("read", ValueError("x" * 100_000))
    assert len(row.message) == MESSAGE_CHARS


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
def test_interrupts_and_exits_are_not_swallowed(exc):
    def stop():
        raise exc()

    with pytest.raises(exc):
        guarded("decode", stop)


def test_in_a_pipeline_one_bad_record_costs_that_record_only_and_is_counted():
    def parse(text: str) -> int:
        return 100 // int(text)  # "0" plants a ZeroDivisionError, "x" a ValueError

    def step(text):
        out = guarded("parse", lambda: parse(text), key=text)
        return ("rejected", out.reason, out.detail["exception"]) if isinstance(out, Rejection) else ("ok", out)

    p = TestPipeline(runner="FnApiRunner")
    out = p | beam.Create(["1", "0", "4", "x"]) | beam.Map(step)
    assert_that(
        out,
        equal_to(
            [
                ("ok", 100),
                ("ok", 25),
                ("rejected", INTERNAL_ERROR, "ZeroDivisionError"),
                ("rejected", INTERNAL_ERROR, "ValueError"),
            ]
        ),
    )
    result = p.run()
    result.wait_until_finish()
    counters = result.metrics().query(beam.metrics.MetricsFilter().with_name(INTERNAL_ERROR))["counters"]
    assert sum(c.committed for c in counters if c.key.metric.namespace == "parse") == 2
