"""``python run.py task=select knowledge=banana`` (or ``task.all_knowledge=true``): choose samples only.

Writes ``selection.json`` per knowledge into the job directory (``selection_<name>.json`` with
``all_knowledge``): accepted candidates with their captions, rejected ones with their reasons.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from knexp.counterfactual.cache import InpaintCache, InpaintOptions
from knexp.data.catalog import Catalog
from knexp.data.loading import load_dataset
from knexp.identification.selection import Selection, select_samples
from knexp.io import atomic_write_text
from knexp.models import load_model, model_identity
from knexp.models.captioning import Captioner
from knexp.store import Store

log = logging.getLogger(__name__)


def run_selection(cfg: DictConfig, catalog: Catalog, captioner: Captioner, data, dataset_id: str, knowledge_name: str,
                  inpaint_cache: InpaintCache) -> Selection:
    """Selection for one knowledge with the task's inpainting options and the model's generation settings."""
    opts = InpaintOptions(**OmegaConf.to_container(cfg.inpaint, resolve=True))
    return select_samples(data, dataset_id, captioner, catalog, catalog[knowledge_name], cfg.data.per_knowledge, cfg.seed, opts,
                          inpaint_cache, batch=cfg.model.generation.batch_size)


def make_captioner(cfg: DictConfig, adapter, model_key: str) -> Captioner:
    """The model's greedy captioner behind the caption store (``paths.cache_dir``/captions; none with
    ``task.cache=false``)."""
    gen = cfg.model.generation
    store = Store(cfg.paths.cache_dir if cfg.task.get("cache", True) else None, "captions")
    return Captioner(adapter, model_key, store, batch_size=gen.batch_size, max_new_tokens=gen.max_new_tokens)


def run(cfg: DictConfig) -> dict:
    catalog = Catalog.load()
    names = catalog.names if cfg.task.all_knowledge else [catalog[cfg.knowledge.name].name]
    data, dataset_id = load_dataset(cfg.data, catalog)
    adapter = load_model(cfg.model, cfg.paths.cache_dir)
    cache = InpaintCache(cfg.paths.cache_dir if cfg.task.cache else None)
    captioner = make_captioner(cfg, adapter, model_identity(cfg.model))
    out = Path(cfg.paths.output_dir)
    summary = {}
    for name in names:
        sel = run_selection(cfg, catalog, captioner, data, dataset_id, name, cache)
        file = "selection.json" if len(names) == 1 else f"selection_{name.replace(' ', '_')}.json"
        atomic_write_text(out / file, json.dumps(sel.to_dict(), indent=1))
        summary[name] = {"accepted": len(sel.accepted), "rejected": len(sel.rejected), "message": sel.message}
    atomic_write_text(out / "select.json", json.dumps(summary, indent=1))
    print(f"selection results: {out}")
    return summary
