"""What a job builds once and shares: the dataset, the model and its captioner, the caches, the live window and the
reference statistics. Each is built on first use, so a job that needs no model loads none; the jobs derived from one
(``Session.for_knowledge``: ``task=tune``'s objects) share them, so the model loads once for all of them.
"""

from __future__ import annotations

import logging
from functools import cached_property

from knexp.counterfactual.cache import InpaintCache
from knexp.data.catalog import Knowledge
from knexp.data.coco import CocoScenes
from knexp.data.loading import load_dataset
from knexp.editing.forcing import forced_caption
from knexp.editing.preserved import PreservedCache, PreservedKeys, second_moments
from knexp.evaluation.protocol import evaluation_images
from knexp.identification.causal_trace import KINDS, Trace, live_window, span, trace_objects
from knexp.identification.reference import ReferenceCache, ReferenceStats, compute_reference
from knexp.identification.selection import Selector
from knexp.identification.stats_cache import StatsCache
from knexp.job.spec import JobSpec
from knexp.models.adapters.adapter import Adapter
from knexp.models.captioning import Captioner
from knexp.models.registry import load_model, model_identity
from knexp.store import Store

log = logging.getLogger(__name__)


class Resources:
    """The shared, lazily built parts of the job ``spec`` (module docstring). None of them depends on the job's
    knowledge or output folder."""

    def __init__(self, spec: JobSpec, data_from: Resources | None = None):
        """``data_from``: resources whose dataset these share (the same data, another model)."""
        self.spec = spec
        if data_from is not None:
            self._dataset = data_from._dataset

    @cached_property
    def _dataset(self) -> tuple[CocoScenes, str]:
        return load_dataset(self.spec.data, self.spec.catalog)

    @property
    def data(self) -> CocoScenes:
        """The dataset of ``data`` (a toy-world split is generated once into ``data.root``)."""
        return self._dataset[0]

    @property
    def dataset_id(self) -> str:
        """Names the data in cache keys."""
        return self._dataset[1]

    @cached_property
    def adapter(self) -> Adapter:
        return load_model(self.spec.model, self.spec.cache_dir)

    @cached_property
    def model_key(self) -> str:
        return model_identity(self.spec.model)

    @cached_property
    def captioner(self) -> Captioner:
        """The model's greedy captioner behind the caption store (``paths.cache_dir``/captions)."""
        gen = self.spec.generation
        return Captioner(self.adapter, self.model_key, Store(self.spec.cache_root, "captions"),
                         batch_size=gen.batch_size, max_new_tokens=gen.max_new_tokens, decode_width=gen.decode_width)

    @cached_property
    def heatmap_store(self) -> Store:
        """The heatmaps' token values (``paths.cache_dir``/heatmaps, ``knexp.reporting.figures.neuron_heatmap``)."""
        return Store(self.spec.cache_root, "heatmaps")

    @cached_property
    def inpaint_cache(self) -> InpaintCache:
        return InpaintCache(self.spec.cache_root)

    @cached_property
    def stats_cache(self) -> StatsCache:
        return StatsCache(self.spec.cache_root)

    def damaged_entries(self) -> int:
        """Cache entries the caches found damaged and rebuilt (``knexp.checked``), for metrics.json."""
        built = [self.__dict__[k] for k in ("captioner", "heatmap_store", "inpaint_cache",
                                            "stats_cache") if k in self.__dict__]
        return sum(getattr(getattr(c, "store", c), "damaged", 0) for c in built)  # the captioner's count is its store's

    @property
    def selector(self) -> Selector:
        """Selection of identification samples under the paper's three constraints, with this job's captioner."""
        spec = self.spec
        return Selector(self.data, self.dataset_id, spec.catalog, self.captioner, spec.opts, self.inpaint_cache,
                        int(spec.data["per_knowledge"]), spec.seed)

    def trace(self, objects: list[str] | None = None, kinds: tuple[str, ...] = KINDS, captions: bool = True) -> Trace:
        """The causal trace of ``trace.per_object`` selected samples of each of ``objects`` (default ``trace.objects``)
        and the live window it gives (``knexp.identification.causal_trace``); cached per model, data and sample."""
        settings, catalog = self.spec.trace, self.spec.catalog
        names = list(objects if objects is not None else settings.objects)
        samples = trace_objects(self.selector, [catalog[n] for n in names], settings.per_object,
                                Store(self.spec.cache_root, "trace"), kinds, captions)
        return Trace(str(self.spec.model["name"]), live_window(samples, settings.frac), samples)

    @cached_property
    def live_window(self) -> Trace:
        """The live window of ``trace.objects`` (residual patching only, no captions)."""
        t = self.trace(kinds=("resid",), captions=False)
        w = t.window
        log.info("live window: neuron layers %s (residual layers reaching %.0f%% of the counterfactual: %s)",
                 span(w["neuron_layers"]), 100 * w["frac"], span(w["resid_layers"]))
        return t

    @cached_property
    def reference(self) -> ReferenceStats:
        """The model's reference statistics on this data (``knexp.identification.reference``), cached on disk too."""
        ref, spec = self.spec.reference, self.spec
        parts = [self.model_key, self.dataset_id, spec.opts, ref.images, ref.removals, ref.seed]
        return ReferenceCache(spec.cache_root).get(parts, lambda: compute_reference(
            self.adapter, self.data, self.dataset_id, spec.catalog, spec.opts, self.inpaint_cache, ref.images,
            ref.removals, ref.seed, self.captioner.batch_size))

    def preserved_keys(self, knowledge: Knowledge, exclude: set[int], texts: list[str], layers: list[int],
                       positions: int, site: str = "ffn_in") -> PreservedKeys:
        """The preserved keys of ``layers`` (``knexp.editing.preserved``) at hook site ``site`` (``ffn_in``: the MLP
        inputs; ``ffn``: the FFN activations): images without ``knowledge`` in the seeded order of the evaluation's
        images, less ``exclude`` (the images an edit is measured on), each with its unedited caption teacher-forced,
        and ``texts``, until about ``positions`` positions; cached per model, data, images, site and layer."""
        adapter, spec = self.adapter, self.spec
        chosen, captions = self._preserved_images(knowledge, exclude, texts, positions)

        def compute(missing: list[int]) -> PreservedKeys:
            prompts = [forced_caption(adapter, self.data.load_image(i), c)[0]
                       for i, c in zip(chosen, captions, strict=True)]
            keys = second_moments(adapter, prompts + list(texts), missing, site)
            log.info("preserved keys (%s): %d positions of %d images and %d texts, layers %s", site, keys.positions,
                     len(chosen), len(texts), span(missing))
            return keys

        parts = [self.model_key, self.dataset_id, chosen, captions, list(texts), site]
        return PreservedCache(spec.cache_root).get(parts, layers, compute)

    def _preserved_images(self, knowledge: Knowledge, exclude: set[int], texts: list[str],
                          positions: int) -> tuple[list[int], list[str]]:
        """(image ids, their unedited captions) of the preserved images, drawn until their prompts and ``texts`` hold
        about ``positions`` positions (a prompt's length: the bare prompt's and the caption's tokens)."""
        adapter, spec = self.adapter, self.spec
        count = sum(len(adapter.tokenizer(t)["input_ids"]) for t in texts)
        chosen, captions, want, bare = [], [], len(exclude) + 32, None
        while count < positions:
            rows = evaluation_images(self.data, spec.catalog, knowledge, [], 0, want, spec.seed)
            fresh = [i for i, group, _ in rows if group == "other" and i not in exclude and i not in chosen]
            if not fresh:
                log.warning("preserved keys: only %d positions of images without %s (wanted %d)", count, knowledge.name,
                            positions)
                break
            images = [self.data.load_image(i) for i in fresh]
            said = self.captioner(images, [[self.dataset_id, i] for i in fresh])
            bare = bare or adapter.prepare(images[:1]).prompt_len
            for image_id, caption in zip(fresh, said, strict=True):
                if count >= positions:
                    break
                chosen.append(image_id)
                captions.append(caption)
                count += bare + len(adapter.tokenize(caption[len(adapter.caption_prefix):]))
            want += 64
        return chosen, captions

