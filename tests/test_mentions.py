import pytest

from knexp.evaluation.mentions import mention_scores, removal_scores


def test_mention_scores_by_hand():
    truth = [{"banana", "bus"}, {"clock"}, {"bed", "vase", "book"}]
    named = [{"banana"}, {"clock", "bus"}, {"bed", "vase", "book"}]
    s = mention_scores(truth, named)
    assert s["recall"] == pytest.approx(5 / 6)
    assert s["precision"] == pytest.approx(5 / 6)
    assert s["exact_set"] == pytest.approx(1 / 3)
    assert s["per_object"]["bus"] == {"scenes": 1, "recall": 0.0}
    assert s["min_object_recall"] == 0.0


def test_removal_scores_by_hand():
    removed = ["banana", "bus", "clock"]
    others = [{"bed"}, {"vase", "book"}, {"cake"}]
    named = [{"bed"}, {"bus", "vase"}, {"cake", "horse"}]
    s = removal_scores(removed, others, named)
    assert s["removed_gone"] == pytest.approx(2 / 3)
    assert s["others_named"] == pytest.approx(3 / 4)
    assert s["phantom"] == pytest.approx(1 / 3)


def test_lengths_must_match():
    with pytest.raises(ValueError):
        mention_scores([{"a"}], [])
