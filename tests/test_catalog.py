import pytest

from knexp.data.catalog import UnknownKnowledgeError


def test_catalog_has_the_30_objects_of_method_md(catalog):
    assert len(catalog) == 30
    assert len({k.coco_id for k in catalog}) == 30
    assert catalog["banana"].coco_id == 52 and catalog["banana"].supercategory == "food"
    assert catalog["tennis_racket"].coco_id == 43  # file-style name works too
    assert catalog["umbrella"].supercategory == "accessory"
    supercats = {k.supercategory for k in catalog}
    assert supercats == {"food", "animal", "vehicle", "furniture", "appliance", "sports", "outdoor", "electronic",
                         "indoor", "accessory"}


@pytest.mark.parametrize(
    "name, caption, expected",
    [
        ("banana", "The image shows a banana.", True),
        ("banana", "Two BANANAS, on a table!", True),
        ("bus", "a business meeting", False),
        ("bed", "a bedroom with a lamp", False),
        ("airplane", "a plane in the sky", True),
        ("airplane", "an aeroplane", True),
        ("tennis racket", "a tennis\nracket and a ball", True),
        ("tennis racket", "a tennis ball", False),
        ("cell phone", "a smartphone", True),
        ("fire hydrant", "a red hydrant.", True),
        ("bear", "a teddy bear", True),
        ("scissors", "a pair of scissors", True),
        ("umbrella", "an umbrella-shaped lamp", False),
    ],
)
def test_word_match(catalog, name, caption, expected):
    assert catalog[name].mentioned_in(caption) is expected


def test_mentioned_returns_every_named_object(catalog):
    assert catalog.mentioned("The image shows a bus, a clock and a pair of scissors.") == {"bus", "clock", "scissors"}
    assert catalog.mentioned("The image shows an empty scene.") == set()


def test_indefinite_phrases(catalog):
    assert catalog["umbrella"].indefinite == "an umbrella"
    assert catalog["airplane"].indefinite == "an airplane"
    assert catalog["banana"].indefinite == "a banana"
    assert catalog["scissors"].indefinite == "a pair of scissors"


def test_unknown_knowledge_lists_valid_names(catalog):
    with pytest.raises(UnknownKnowledgeError) as err:
        catalog["zebra"]
    msg = str(err.value)
    assert "zebra" in msg and "banana" in msg and "traffic_light" in msg
