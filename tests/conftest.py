import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def catalog():
    from knexp.job import default_catalog

    return default_catalog()


@pytest.fixture(scope="module", params=["embedded", "llava", "minigpt4"])
def adapter(request):
    """Each tiny model family in its adapter (float32), with the test module's ``ADAPTER_LAYERS`` decoder layers (3)."""
    from knexp.models.tiny import tiny_adapter

    return tiny_adapter(request.param, layers=getattr(request.module, "ADAPTER_LAYERS", 3))


def _random_pair(adapter, seed: int):
    """Two random uint8 RGB images ("original", "inpainted") at the adapter's input size (60 px for the tiny LLaVA)."""
    import numpy as np

    from knexp.models.llava import LlavaAdapter

    size = 60 if isinstance(adapter, LlavaAdapter) else 224
    rng = np.random.default_rng(seed)
    return [(rng.random((size, size, 3)) * 255).astype(np.uint8) for _ in range(2)]


@pytest.fixture(scope="session")
def random_pair():
    """(adapter, seed) -> [original, inpainted]: random images for the formula tests on tiny models."""
    return _random_pair


def _job_files(job: Path) -> dict[str, bytes]:
    """Every result file of a job directory, minus logs, Hydra's copy of the config (it names the folder), W&B
    and wall times, which are the only things allowed to differ between two runs of one config."""
    files = {}
    for path in sorted(job.rglob("*")):
        rel = path.relative_to(job).as_posix()
        if not path.is_file() or rel.endswith(".log") or rel.startswith((".hydra/", "wandb/")) or rel == "done.json":
            continue
        data = path.read_bytes()
        if rel == "metrics.json":
            m = json.loads(data)
            m.pop("wall_time_s")
            data = json.dumps(m, sort_keys=True).encode()
        files[rel] = data
    return files


@pytest.fixture
def job_files():
    """job folder -> {relative path: bytes} of its results (for byte-for-byte determinism checks)."""
    return _job_files
