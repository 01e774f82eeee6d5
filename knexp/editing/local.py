"""The ``local`` rule: the optimized fit of the set's ``down_proj`` columns with a penalty on what the edit changes at
preserved positions (docs/method.md, "Locality by construction").

A column edit Delta_l [d_model, U] of layer l changes the FFN's output at a position t by Delta_l O_t[units], so over
the preserved positions (images without k, never measured, with their captions, and text prompts;
``knexp.editing.preserved``) its mean squared change is

    (1/n) sum_t ||Delta_l O_t[units]||^2 = tr(Delta_l A_l Delta_l^T),    A_l = (1/n) sum_t O_t[units] O_t[units]^T

the uncentred second moment of the set's activations there [U, U]. The fit (``knexp.editing.fit.fit_columns``) adds
lam * sum_l tr(Delta_l A_l Delta_l^T) / tr(W_l A_l W_l^T): each layer's change at preserved positions relative to
what the set's columns W_l write there now, so lam does not depend on the model's scale. With the one to three
neurons a set has per layer, A_l has full rank and a strict null-space projection of the columns would keep nothing;
a penalty keeps what the preserved positions do not use much. By default the fit stops on the fitting images' greedy
captions (``stop=captions``).
"""

from __future__ import annotations

from dataclasses import dataclass

from knexp.editing.fit import FitData, Penalty, fit_columns
from knexp.editing.inputs import EditInputs, PreservedSite
from knexp.editing.preserved import PreservedKeys
from knexp.editing.rules import Optimized
from knexp.editing.sets import by_layer
from knexp.settings import Number, check_fields


@dataclass
class LocalFit:
    """What the ``local`` rule reads: the optimized rule's fitting data, and the preserved second moments of the FFN
    activations of the layers a set needs, computed once over at least ``per_unit`` x d_ff positions and kept."""

    inputs: EditInputs
    data: FitData
    per_unit: float

    def __post_init__(self):
        self._moments = PreservedSite(self.inputs, self.per_unit, "ffn")

    def moments(self, layers: list[int]) -> PreservedKeys:
        """A_l over every FFN unit of ``layers`` (float64 [d_ff, d_ff] each)."""
        return self._moments(layers)


@dataclass
class Local(Optimized):
    """The optimized fit plus ``lam`` times the relative change at preserved positions (module docstring);
    ``per_unit``: preserved positions per FFN unit."""

    name: str = "local"
    lam: float = 100.0
    per_unit: float = 10.0

    def __post_init__(self):
        super().__post_init__()
        check_fields(self, "edit.rule", lam=Number(low=0.0), per_unit=Number(low=0.0, low_open=True))

    def context(self, inputs: EditInputs) -> LocalFit:
        return LocalFit(inputs, Optimized.context(self, inputs), self.per_unit)

    def prepare(self, adapter, neurons, context: LocalFit) -> None:
        context.moments(sorted(set(neurons.layers.tolist())))

    def make(self, adapter, neurons, target, context: LocalFit):
        units = by_layer(neurons)
        moments = context.moments(list(units))
        restricted = {layer: moments.second[layer][u][:, u].float() for layer, u in units.items()}  # A_l [U, U]
        edit = fit_columns(adapter, neurons, target, context.data, self, Penalty(restricted, self.lam))
        edit.provenance.update(rule=self.name, preserved_positions=moments.positions, **self.settings())
        return edit
