"""The general-ability guard of an edit (knexp.evaluation.edit_measures, "general"): its images (one order for every
object, none showing an edited object), its prompts (at least 100, none naming a catalog object; a missing file is one
line naming the setting), and the mentions it follows."""

import pytest

from knexp.evaluation.edit_measures import leak, mentions_kept, read_prompts
from knexp.evaluation.protocol import general_images
from knexp.settings import SettingError


class _Scenes:
    """Images 0..59; image i shows category (i % 6) + 1; image 7 cannot be used."""

    image_ids = list(range(60))

    def category_ids(self, image_id):
        return [image_id % 6 + 1]

    def image_problem(self, image_id):
        return "unreadable" if image_id == 7 else None


class _K:
    def __init__(self, coco_id):
        self.coco_id = coco_id


def test_the_guards_images_avoid_the_edited_objects_and_are_the_same_for_every_object():
    data = _Scenes()
    one = general_images(data, [_K(1)], 20, exclude={3, 4}, seed=0)
    two = general_images(data, [_K(2)], 20, exclude=set(), seed=0)
    assert len(one) == 20 and not {3, 4, 7} & set(one) and all(i % 6 != 0 for i in one)  # category 1: i % 6 == 0
    assert all(i % 6 != 1 for i in two) and 7 not in two
    # the images neither object shows come in the same order for both
    common = [i for i in one if i % 6 not in (0, 1) and i not in (3, 4)]
    also = [i for i in two if i % 6 not in (0, 1) and i not in (3, 4)]
    n = min(len(common), len(also))
    assert n >= 10 and common[:n] == also[:n]
    assert len(general_images(data, [_K(c) for c in range(1, 7)], 5, set(), seed=0)) == 0  # nothing left to show


def test_the_guards_prompts_are_over_100_and_name_no_catalog_object(catalog):
    prompts = read_prompts(None, "task.general_texts")
    assert len(prompts) >= 100 and len(set(prompts)) == len(prompts)
    assert not any(p.startswith("#") for p in prompts)
    named = [(p, k.name) for p in prompts for k in catalog if k.mentioned_in(p)]
    assert named == []


def test_a_missing_prompt_file_is_one_error_naming_the_setting(tmp_path):
    with pytest.raises(SettingError) as caught:
        read_prompts(str(tmp_path / "nowhere.txt"), "task.general_texts")
    assert "task.general_texts" in str(caught.value) and "one prompt per line" in str(caught.value)
    (tmp_path / "mine.txt").write_text("# a comment\nThe sky is\n\n  Two and two make \n")
    assert read_prompts(str(tmp_path / "mine.txt"), "task.general_texts") == ["The sky is", "Two and two make"]


def test_mentions_kept_counts_only_the_objects_the_unedited_caption_named(catalog):
    objects = [catalog["clock"], catalog["book"], catalog["bus"]]
    references = ["The image shows a clock and a book", "The image shows a bus", "The image shows a field"]
    captions = ["The image shows a clock", "The image shows a red bus", "The image shows a clock"]
    # named before: clock, book (image 1), bus (image 2); kept: clock, bus
    assert mentions_kept(captions, references, objects) == {"mentions_kept": 2 / 3, "mentions_n": 3}
    assert mentions_kept([], [], objects) == {"mentions_kept": None, "mentions_n": 0}


def test_the_fits_prompts_are_never_measured_and_name_no_catalog_object(catalog):
    """The prompts a fitted edit keeps (edit.fit_texts) share none with T-locality's (edit.texts, edit.k_texts for any
    object) or the guard's, and name no catalog object."""
    from knexp.job.session import session

    settings = session("model=embedded").spec.edit
    fitted = settings.fit_prompts
    measured = set(settings.texts) | set(read_prompts(None, "task.general_texts"))
    measured |= {t for k in catalog for t in settings.about_k(k)}
    assert len(fitted) >= 40 and not set(fitted) & measured
    assert [(p, k.name) for p in fitted for k in catalog if k.mentioned_in(p)] == []


def test_the_leak_counts_the_goal_named_where_the_unedited_caption_did_not(catalog):
    """A swap's partner named in 1 of the 2 captions that did not name it before; a caption that named it before is no
    leak whatever it says now."""
    partner = catalog["cake"]
    references = ["The image shows a table", "The image shows a cake", "The image shows a dog"]
    captions = ["The image shows a cake on a table", "The image shows a cake", "The image shows a dog"]
    assert leak(captions, references, partner) == {"leak": 0.5, "leak_n": 2}
