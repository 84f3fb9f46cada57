"""The tests' own `assert_close` fails on every kind of difference it exists to catch."""
import math

import pytest
import torch
from _helpers import assert_close

NAN, INF = math.nan, math.inf
TOL = dict(atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("actual, expected", [
    ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]),
    ([1.0, 2.0 + 1e-6], [1.0, 2.0]),  # within atol + rtol * |expected|
    ([NAN, 2.0, INF, -INF], [NAN, 2.0, INF, -INF]),  # the same non-finite values in the same places
    ([], []),
])
def test_equal_or_close_tensors_pass(actual, expected):
    assert_close(torch.tensor(actual), torch.tensor(expected), **TOL)


@pytest.mark.parametrize("actual, expected, first_bad", [
    ([1.0, 2.1], [1.0, 2.0], [[1]]),
    ([NAN, 2.0], [1.0, NAN], [[0], [1]]),  # NaNs on both sides, at different positions
    ([1.0, NAN], [1.0, 2.0], [[1]]),
    ([INF, 2.0], [-INF, 2.0], [[0]]),
    ([INF, 2.0], [NAN, 2.0], [[0]]),
    ([1e30, 2.0], [INF, 2.0], [[0]]),
])
def test_any_difference_fails_and_says_where(actual, expected, first_bad):
    with pytest.raises(AssertionError) as error:
        assert_close(torch.tensor(actual), torch.tensor(expected), **TOL, name="x")
    assert str(error.value).startswith("x: ") and str(first_bad) in str(error.value)


def test_shapes_must_match():
    with pytest.raises(AssertionError, match=r"shape \(2,\) != \(1, 2\)"):
        assert_close(torch.zeros(2), torch.zeros(1, 2), **TOL)
