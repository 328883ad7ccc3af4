import numpy as np
import pytest

from jumplora_hf.metrics import (
    backward_transfer,
    final_row_is_complete,
    forward_transfer,
    mean_jaccard_with_previous,
    overall_accuracy,
    pack_support,
    support_jaccard,
    support_sparsity,
)

ACC = [[0.9, None, None], [0.7, 0.8, None], [0.5, 0.6, 1.0]]


def test_overall_backward_forward_transfer():
    assert overall_accuracy(ACC) == pytest.approx((0.5 + 0.6 + 1.0) / 3)
    assert backward_transfer(ACC) == pytest.approx(((0.5 - 0.9) + (0.6 - 0.8)) / 2)
    assert forward_transfer(ACC, [1.0, 0.9, 0.8]) == pytest.approx(((0.9 - 1.0) + (0.8 - 0.9) + (1.0 - 0.8)) / 3)


def test_partially_filled_matrix_uses_last_filled_row():
    partial = [[0.9, None, None], [0.7, 0.8, None], [None, None, None]]
    assert overall_accuracy(partial) == pytest.approx(0.75)
    assert backward_transfer(partial) == pytest.approx(-0.2)
    assert backward_transfer([[0.9]]) is None


def test_a_matrix_evaluated_at_the_end_only_needs_its_last_row_complete():
    at_end = [[0.9, None, None], [None, 0.8, None], [0.5, 0.6, 1.0]]  # eval_seen_tasks="at_end"
    assert final_row_is_complete(at_end)
    assert overall_accuracy(at_end) == overall_accuracy(ACC) and backward_transfer(at_end) == backward_transfer(ACC)
    assert forward_transfer(at_end, [1.0, 0.9, 0.8]) == forward_transfer(ACC, [1.0, 0.9, 0.8])
    before_the_end = [[0.9, None, None], [None, 0.8, None], [None, None, None]]
    assert not final_row_is_complete(before_the_end)
    with pytest.raises(ValueError, match=r"row 1 of the accuracy matrix lacks tasks \[0\].*at_end"):
        overall_accuracy(before_the_end)
    with pytest.raises(ValueError, match="lacks tasks"):
        backward_transfer(before_the_end)
    assert forward_transfer(before_the_end, [1.0, 0.9]) == pytest.approx(-0.1)  # the diagonal is there


def test_support_sparsity_and_jaccard_match_dense_definitions():
    rng = np.random.default_rng(0)
    a, b = rng.random((37, 11)) > 0.8, rng.random((37, 11)) > 0.7
    assert support_sparsity(pack_support(a), a.size) == pytest.approx(1 - a.sum() / a.size)
    assert support_jaccard(pack_support(a), pack_support(b)) == pytest.approx((a & b).sum() / (a | b).sum())
    empty = pack_support(np.zeros(5, bool))
    assert support_jaccard(empty, empty) == 0.0
    overlap = mean_jaccard_with_previous({"l": pack_support(a)}, [{"l": pack_support(b)}, {"l": pack_support(a)}])
    assert overlap["l"] == pytest.approx(((a & b).sum() / (a | b).sum() + 1.0) / 2)
