"""``python -m knexp.models.prepare``: check the offline packages and convert the LM once (make install)."""

from __future__ import annotations

import logging
import sys

from knexp.models.offline import OfflineWeightsMissing, efficientnet_lite0_weights, minilm_folder, smollm2_folder
from knexp.paths import default_cache_dir


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print("efficientnet-lite0 weights:", efficientnet_lite0_weights())
        print("BERTScore model folder:", minilm_folder())
        print("SmolLM2 folder:", smollm2_folder(default_cache_dir()))
    except OfflineWeightsMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
