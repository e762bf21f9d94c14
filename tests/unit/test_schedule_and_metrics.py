"""b_ratio schedule and metric aggregation rules (pure)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordexp.telemetry.metrics import MetricBuffer, percentile, reduce_buffers
from coordexp.trainer.schedule import is_channel_b, realized_b_ratio


def channels(ratio, steps):
    return "".join("B" if is_channel_b(s, ratio) else "A" for s in range(steps))


def test_schedule_patterns():
    assert channels(0.0, 6) == "AAAAAA"
    assert channels(1.0, 6) == "BBBBBB"
    assert channels(0.5, 6) == "ABABAB"
    assert channels(0.25, 8) == "AAABAAAB"
    assert channels(0.05, 20) == "A" * 19 + "B"


@given(st.floats(0, 1), st.integers(1, 400))
def test_schedule_counts_match_the_ratio(ratio, steps):
    n_b = sum(is_channel_b(s, ratio) for s in range(steps))
    assert n_b == int(steps * ratio // 1) or abs(n_b - steps * ratio) < 1
    assert realized_b_ratio(steps, ratio) == pytest.approx(n_b / steps)


@given(st.floats(0, 1), st.integers(0, 200), st.integers(1, 200))
def test_schedule_resumes_at_the_same_position(ratio, done, more):
    full = channels(ratio, done + more)
    resumed = "".join("B" if is_channel_b(s, ratio) else "A" for s in range(done, done + more))
    assert full[done:] == resumed


def test_percentile_matches_numpy_linear():
    import numpy as np

    values = [3.0, 1.0, 7.0, 2.0, 10.0, 4.0]
    assert percentile(values, 99) == pytest.approx(float(np.percentile(values, 99)))
    assert percentile([], 99) == 0.0


def test_reduce_rules_sum_max_ratio_p99():
    a, b = MetricBuffer(), MetricBuffer()
    a.add_sum("rollout/fp", 2), b.add_sum("rollout/fp", 3)
    a.add_max("time/rollout_s", 1.5), b.add_max("time/rollout_s", 0.5)
    a.add_ratio("rollout/parse_truncated_rate", 1, 4), b.add_ratio("rollout/parse_truncated_rate", 3, 4)
    a.add_mean("loss/ce", 2.0), a.add_mean("loss/ce", 4.0), b.add_mean("loss/ce", 6.0)
    a.add_samples("rollout/gen_new_tokens_p99", [1, 2, 3, 100])
    b.add_samples("rollout/gen_new_tokens_p99", [5])
    b.add_sum("only/on_b", 1)
    out = reduce_buffers([a.to_payload(), b.to_payload()])
    assert out == {
        "rollout/fp": 5.0,
        "time/rollout_s": 1.5,
        "rollout/parse_truncated_rate": 0.5,
        "loss/ce": 4.0,
        "rollout/gen_new_tokens_p99": pytest.approx(percentile([1, 2, 3, 100], 99)),
        "only/on_b": 1.0,
    }


def test_zero_denominator_ratio_is_zero():
    buf = MetricBuffer()
    buf.add_ratio("rollout/precision", 0, 0)
    assert reduce_buffers([buf.to_payload()]) == {"rollout/precision": 0.0}
