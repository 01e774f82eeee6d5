"""Counterfactual stage: images with one object inpainted away (METHOD.md, Stage 1)."""

from knexp.counterfactual.inpaint import INPAINT_METHODS, inpaint, region_mask

__all__ = ["INPAINT_METHODS", "inpaint", "region_mask"]
