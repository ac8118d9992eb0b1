"""Weight vectors of every method, against the formulas of README.md's methods table."""

import math

import pytest

from merger.errors import UsageError
from merger.plan.methods import Method, parse_weights, weights_for


def test_uniform_linear():
    assert weights_for(Method("uniform"), 4) == [0.25] * 4
    assert weights_for(Method("linear"), 4) == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_ema_matches_recursion():
    b, n = 0.8, 5
    w = weights_for(Method("ema", decay=b), n)
    # e_1 = x_1, e_i = b e_{i-1} + (1-b) x_i, expanded into weights on x_1..x_n
    e = [1.0] + [0.0] * (n - 1)
    for i in range(1, n):
        e = [b * v for v in e]
        e[i] += 1 - b
    assert w == pytest.approx(e, abs=1e-15)
    assert math.fsum(w) == pytest.approx(1.0, abs=1e-15)


def test_weights_normalised_and_raw():
    assert weights_for(Method("weights", weights=(1, 1, 2)), 3) == [0.25, 0.25, 0.5]
    assert weights_for(Method("weights", weights=(1, 1, 2), normalize=False), 3) == [1, 1, 2]


@pytest.mark.parametrize("method,n,msg", [
    (Method("weights", weights=(1, 2)), 3, "has 2 values but 3"),
    (Method("weights", weights=(1, -2)), 2, "sum to -1"),
    (Method("weights", weights=(1, float("nan"))), 2, "NaN"),
    (Method("ema"), 3, "needs --decay"),
    (Method("ema", decay=1.5), 3, "outside (0, 1)"),
    (Method("nope"), 3, "unknown method"),
])
def test_bad_weights(method, n, msg):
    with pytest.raises(UsageError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        weights_for(method, n)


def test_parse_weights():
    assert parse_weights("1,2.5,3") == (1.0, 2.5, 3.0)
    with pytest.raises(UsageError):
        parse_weights("1,,2")
    with pytest.raises(UsageError):
        parse_weights("a,b")
