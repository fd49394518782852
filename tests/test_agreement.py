"""Cohen's kappa against textbook and hand-computed values."""

from __future__ import annotations

import math

import pytest

from emolens.errors import EmolensError
from emolens.experiments.agreement import cohen_kappa


def test_textbook_two_category_example():
    # 50 items: both yes 20, first yes / second no 5, first no / second yes 10, both no 15.
    # p_o = 0.7, p_e = 0.5*0.6 + 0.5*0.4 = 0.5, kappa = 0.2 / 0.5 = 0.4.
    first = ["yes"] * 25 + ["no"] * 25
    second = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(first, second) == pytest.approx(0.4)


# Six items on a 0-2 scale with three exact agreements and three one-step disagreements.
# Unweighted: p_o = 1/2, p_e = 1/3, kappa = 1/4. Linear: observed disagreement 0.25,
# expected 1.25/3, kappa = 0.4. Quadratic: 0.125 against 0.875/3, kappa = 4/7.
FIRST = [0, 1, 2, 0, 1, 1]
SECOND = [0, 1, 2, 1, 2, 0]


@pytest.mark.parametrize(
    ("weights", "expected"), [(None, 0.25), ("linear", 0.4), ("quadratic", 4 / 7)]
)
def test_weighted_kappa_hand_computed(weights, expected):
    assert cohen_kappa(FIRST, SECOND, weights=weights) == pytest.approx(expected)


def test_categories_fix_the_distance_scale():
    # Ratings 0, 1 and 3 only: by default 1 and 3 sit next to each other (same numbers as
    # above); on the declared 0-3 scale they are two steps apart, which changes the weighting.
    first = [0, 1, 3, 0, 1, 1]
    second = [0, 1, 3, 1, 3, 0]
    assert cohen_kappa(first, second, weights="linear") == pytest.approx(0.4)
    declared = cohen_kappa(first, second, weights="linear", categories=[0, 1, 2, 3])
    assert declared != pytest.approx(0.4)
    assert cohen_kappa(first, second, categories=[0, 1, 2, 3]) == pytest.approx(0.25)


def test_perfect_and_chance_level_agreement():
    assert cohen_kappa(["a", "b", "a"], ["a", "b", "a"]) == pytest.approx(1.0)
    assert cohen_kappa(["a", "a", "b", "b"], ["a", "b", "a", "b"]) == pytest.approx(0.0)


def test_pairs_with_a_missing_rating_are_left_out():
    assert cohen_kappa(FIRST + [None, 2], SECOND + [1, None]) == pytest.approx(0.25)


def test_undefined_when_both_raters_use_one_category():
    assert math.isnan(cohen_kappa(["refuse"] * 4, ["refuse"] * 4))


def test_errors_are_clear():
    with pytest.raises(EmolensError, match="3 ratings against 2"):
        cohen_kappa([1, 2, 3], [1, 2])
    with pytest.raises(EmolensError, match="no item has both"):
        cohen_kappa([None], [1])
    with pytest.raises(EmolensError, match="weights"):
        cohen_kappa([1], [1], weights="cubic")
    with pytest.raises(EmolensError, match="not in categories"):
        cohen_kappa([1, 5], [1, 1], categories=[0, 1, 2])
