"""Model adapters: the only place that knows a model family's internals (see ``base.Adapter``)."""

from knexp.models.adapters.base import GREEDY, Adapter, PatchGeometry, Prepared

__all__ = ["GREEDY", "Adapter", "PatchGeometry", "Prepared"]
