"""Data stage: the knowledge catalog, word matching, COCO-format datasets (real COCO and the toy world)."""
