import numpy as np
import pytest

from knexp.counterfactual.inpaint import inpaint, region_mask
from knexp.user_errors import ConfigError


def test_bbox_region_rounds_outwards_and_dilates():
    m = region_mask((20, 30), bbox=(2.5, 3.2, 4.0, 5.0))
    ys, xs = np.nonzero(m)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (2, 6, 3, 8)
    d = region_mask((20, 30), bbox=(2.5, 3.2, 4.0, 5.0), dilation=2)
    ys, xs = np.nonzero(d)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (0, 8, 1, 10)
    assert m.dtype == np.uint8 and set(np.unique(m)) == {0, 255}


def test_segm_region_uses_the_mask():
    seg = np.zeros((10, 10), bool)
    seg[2:4, 5:9] = True
    assert (region_mask((10, 10), segmentation=seg, region="segm") > 0).sum() == 8


def test_telea_removes_a_square_and_touches_nothing_else():
    img = np.full((64, 64, 3), 120, np.uint8)
    img[20:40, 20:40] = (250, 10, 10)
    mask = region_mask(img.shape[:2], bbox=(20, 20, 20, 20), dilation=1)
    out = inpaint(img, mask, radius=3, method="telea")
    assert np.abs(out[20:40, 20:40].astype(int) - 120).max() < 10  # the red square is gone
    outside = mask == 0
    assert np.array_equal(out[outside], img[outside])
    ns = inpaint(img, mask, radius=3, method="ns")
    assert np.abs(ns[20:40, 20:40].astype(int) - 120).max() < 10


def test_bad_arguments_say_what_to_use():
    with pytest.raises(ConfigError, match="telea"):
        inpaint(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8), method="fast")
    with pytest.raises(ValueError, match="bbox"):
        region_mask((4, 4), region="box")
