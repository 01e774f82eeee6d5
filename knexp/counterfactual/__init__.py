"""Counterfactual stage: images with one object inpainted away (docs/method.md, "Stage 1: activation differences by
inpainting"): the inpainting itself (``inpaint``) and its cache with the options that name it (``cache``)."""
