"""Localization measures of a map over the image tokens (knexp.evaluation.localization): maps with known answers, the
chance levels (a constant map scores chance; area IoU near a / (2 - a)), random tie-breaking against brute force, and
AUC against its pairwise definition."""

import itertools

import numpy as np
import pytest

from knexp.evaluation.localization import area_iou, auc, chance, localization, pointing


def _mask(p: int, tokens) -> np.ndarray:
    inside = np.zeros(p, bool)
    inside[list(tokens)] = True
    return inside


def test_a_map_equal_to_the_mask_scores_one_and_its_negation_scores_worst():
    inside = _mask(49, [3, 4, 10, 11, 17])
    assert localization(inside.astype(float), inside) == {"pointing": 1.0, "area_iou": 1.0, "auc": 1.0}
    worst = localization(-inside.astype(float), inside)
    assert worst["pointing"] == 0.0 and worst["area_iou"] == 0.0 and worst["auc"] == 0.0


@pytest.mark.parametrize("n", [1, 5, 12, 30])
def test_a_constant_map_scores_chance(n):
    inside = _mask(49, range(n))
    constant = localization(np.full(49, 0.3), inside)
    assert constant == chance(inside)
    assert constant["pointing"] == pytest.approx(n / 49) and constant["auc"] == 0.5
    a = n / 49  # the expected IoU of a random n-subset is close to a / (2 - a)
    assert constant["area_iou"] == pytest.approx(a / (2 - a), abs=0.05)


def test_ties_are_broken_at_random_as_brute_force_over_every_order_says():
    """A map with ties at the cut: the expected IoU over every tie order equals the closed form, and the pointing
    game over the tied maxima is their share of object tokens."""
    scores = np.array([5.0, 3.0, 3.0, 3.0, 1.0, 0.0])
    inside = _mask(6, [1, 4, 5])  # n = 3: token 0 is sure, two of the three 3.0s are drawn
    ious = []
    for drawn in itertools.combinations([1, 2, 3], 2):
        top = {0, *drawn}
        x = len(top & {1, 4, 5})
        ious.append(x / (6 - x))
    assert area_iou(scores, inside) == pytest.approx(np.mean(ious))
    assert pointing(np.array([2.0, 2.0, 2.0, 0.0, 0.0, 0.0]), inside) == pytest.approx(1 / 3)


def test_auc_is_the_share_of_object_other_pairs_ranked_right_ties_half():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, 30).astype(float)  # many ties
    inside = rng.random(30) < 0.3
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a in scores[inside] for b in scores[~inside]]
    assert auc(scores, inside) == pytest.approx(np.mean(pairs))


def test_an_object_on_no_token_or_every_token_has_no_measure():
    for inside in (np.zeros(9, bool), np.ones(9, bool)):
        assert localization(np.arange(9.0), inside) == {"pointing": None, "area_iou": None, "auc": None}
    with pytest.raises(ValueError, match="9 tokens against a mask of 4"):
        pointing(np.arange(9.0), np.ones(4, bool))
