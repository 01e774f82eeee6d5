"""Instrumentation at image tokens: record activations (and gradients) and intervene on them.

Hooks sit at the adapter's hook sites (``Adapter.sites``), each a tensor [B, T, d] per decoder layer l, e.g.
  ``ffn``        O^l [B, T, d_f], the neuron activations: the input of layer l's FFN output projection
                 (``Adapter.ffn_out``; METHOD.md, "Notation"), the default of ``record`` and ``intervene``;
  ``resid_pre``  the residual stream entering decoder layer l [B, T, d_model] (the causal trace's state (a));
  ``ffn_act``    act(gate(x)) [B, T, d_f] (a module's output: Pan et al.'s hook point).
``attached`` is the one place hooks on a prompt's pass are registered: it takes ``(site, layer)`` keys for input and output sites
alike, and gives each hook the tensor and where its pass starts in the prompt (``start``: x[:, j] is prompt position
start + j). Its one prefill guard lets a hook act only on a pass of the prepared prompt that covers the image tokens
(``Prepared.pass_start``): cached decoding steps and a shared prefix computed alone are untouched, so an intervention
reaches generation through the KV cache alone. Every hook is removed when its ``with`` block ends, also on an
exception. ``everywhere`` is its unguarded twin: hooks on every pass at every position (the prompt, a shared prefix,
each decoding step), which is what a weight edit changes (``knexp.editing``: the exactness check). ``banned`` keeps
some tokens from ever being generated (the decoding-time filter that edits are compared with).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from knexp.models.adapter import Adapter
from knexp.models.prefix_cache import forget
from knexp.models.prepared import Prepared

REDUCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "max": lambda t: t.amax(dim=1),  # over image positions: [B, P, d_f] -> [B, d_f]
    "mean": lambda t: t.mean(dim=1),
}
Hook = Callable[[torch.Tensor, int], "torch.Tensor | None"]  # (x [B, n, d], the pass's first prompt position) -> new x or None


def _first_position(kwargs: dict) -> int | None:
    """The first position a decoder layer is given (``position_ids`` [B, n], sequence positions), or None: a layer
    given none, or multimodal positions [3, B, n], whose first entry is no sequence index."""
    pos = kwargs.get("position_ids")
    return int(pos[0, 0]) if isinstance(pos, torch.Tensor) and pos.dim() == 2 and pos.numel() else None


@contextmanager
def attached(adapter: Adapter, hooks: dict[tuple[str, int], Hook], prefill: Prepared) -> Iterator[None]:
    """Call ``hooks[(site, l)](x, start)`` on the tensor x [B, n, d] of hook site ``site`` in layer l (``Adapter.site``)
    during each pass of the prepared prompt ``prefill``: an input site's hook runs before its module uses x, an output
    site's after the module made it; a returned tensor replaces x. ``start`` is the prompt position of x[:, 0]
    (``Prepared.pass_start``: from the positions the decoder layer is given, where knexp's own passes may start after a
    shared prefix; from the length alone for a model without fast paths, which runs only its own passes). Other passes
    (a decoding step, a shared prefix computed alone) are not seen: the one prefill guard. The hooks are marked
    ``prompt_pass_only``, so ``knexp.models.decode_step`` may compute a step without calling the modules they sit on.
    The hooks are always removed."""
    starts: dict[int, int | None] = {}  # by layer, while the layer runs: where its pass starts (None: no pass of the prompt)

    shortest = prefill.prompt_len - prefill.first_image  # a pass shorter than this holds no image token (a decoding step)

    def locate(layer: int):
        def pre_hook(module, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            starts[layer] = None if x.shape[1] < shortest else prefill.pass_start(x.shape[1], _first_position(kwargs))

        pre_hook.prompt_pass_only = True  # it changes nothing
        return pre_hook

    def forget(layer: int):
        def post_hook(module, args, output):
            starts[layer] = None

        post_hook.prompt_pass_only = True
        return post_hook

    located = adapter.fast_paths  # only knexp's own passes start after a shared prefix (or compute one alone)

    def start_of(layer: int, x: torch.Tensor) -> int | None:
        """The pass start of ``x`` in ``layer``: the layer's, when it runs a pass of the prompt that ends where x does. A
        model without fast paths runs only its own passes, the prompt's whole (from 0) and one position per decoding
        step: the length tells them apart."""
        if x.shape[1] < shortest:
            return None
        if not located:
            return prefill.pass_start(x.shape[1])
        start = starts.get(layer)
        return start if start is not None and start + x.shape[1] == prefill.prompt_len else None

    def before(hook: Hook, layer: int):
        def pre_hook(module, args, kwargs):
            from_kwargs = "hidden_states" in kwargs
            x = kwargs["hidden_states"] if from_kwargs else args[0]
            start = start_of(layer, x)
            new = hook(x, start) if start is not None else None
            if new is None:
                return None
            if from_kwargs:
                return args, {**kwargs, "hidden_states": new}
            return (new, *args[1:]), kwargs

        pre_hook.prompt_pass_only = True
        return pre_hook

    def after(hook: Hook, layer: int):
        def post_hook(module, args, output):
            start = start_of(layer, output)
            return hook(output, start) if start is not None else None

        post_hook.prompt_pass_only = True
        return post_hook

    handles = []
    try:
        for layer in sorted({layer for _, layer in hooks}) if located else ():  # each layer's pass start, before its sites
            layer_module = adapter.decoder_layers()[layer]
            handles.append(layer_module.register_forward_pre_hook(locate(layer), with_kwargs=True, prepend=True))
            handles.append(layer_module.register_forward_hook(forget(layer), always_call=True))
        for (site, layer), hook in hooks.items():
            module, when = adapter.site(site, layer)
            if when == "pre":
                handles.append(module.register_forward_pre_hook(before(hook, layer), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(after(hook, layer)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def gradient_anchor(adapter: Adapter, prefill: Prepared) -> Iterator[None]:
    """Make every later activation of a pass of ``prefill`` (a prepared prompt's pass, or a pass of that length) part
    of the autograd graph, cheaply.

    A zero scalar that requires grad is added to the first decoder layer's input: values are unchanged,
    but each layer's O^l now has a gradient path, so a tensor hook on O^l receives dy/dO^l in the one
    backward pass. Nothing is copied or detached, so no path between layers is cut.
    """

    def anchor(h: torch.Tensor, start: int) -> torch.Tensor:
        return h + torch.zeros((), dtype=h.dtype, device=h.device, requires_grad=True)

    with attached(adapter, {("resid_pre", 0): anchor}, prefill=prefill):
        yield


def _index(prepared: Prepared) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [B, 1], positions [B, P]) to gather image-token rows of a [B, T, ...] tensor."""
    pos = prepared.image_positions
    return torch.arange(pos.shape[0], device=pos.device)[:, None], pos


def _resolve_layers(adapter: Adapter, layers) -> list[int]:
    n = adapter.num_layers
    chosen = list(range(n)) if layers is None else sorted({int(layer) for layer in layers})
    bad = [layer for layer in chosen if not 0 <= layer < n]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {n} decoder layers (0..{n - 1})")
    return chosen


@dataclass
class Recording:
    """What ``record`` captured, per layer index.

    ``activations[l]``: O'^l, float32 [B, P, d_f], or [B, d_f] after ``reduce``.
    ``gradients[l]``: dy/dO'^l [B, P, d_f] (``with_grad`` and no ``reduce``).
    ``gradcam[l]``: O'^l * dy/dO'^l [B, P, d_f] or reduced [B, d_f] (``with_grad``).
    Gradients appear after the caller's ``backward()`` on a scalar of the recorded pass.
    """

    activations: dict[int, torch.Tensor] = field(default_factory=dict)
    gradients: dict[int, torch.Tensor] = field(default_factory=dict)
    gradcam: dict[int, torch.Tensor] = field(default_factory=dict)
    passes: int = 0

    def stacked(self, what: str = "activations") -> torch.Tensor:
        """Layers stacked in layer order: [L, B, P, d_f] (or [L, B, d_f])."""
        d = getattr(self, what)
        return torch.stack([d[k] for k in sorted(d)])


@contextmanager
def record(adapter: Adapter, prepared: Prepared, layers=None, with_grad: bool = False, reduce: str | None = None,
           site: str = "ffn") -> Iterator[Recording]:
    """Record the ``site`` tensor (default O') at the image positions of ``prepared`` for ``layers`` (default all).

    With ``with_grad``, the pass is anchored (``gradient_anchor``) and a tensor hook on each O^l catches
    dy/dO^l in the caller's one backward pass of any scalar y; with ``reduce``, only the reduction of
    O' * dy/dO' is kept. The caller runs the forward (under ``torch.enable_grad()``) and the backward.
    """
    if reduce is not None and reduce not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduce!r}; use one of {sorted(REDUCTIONS)} or None")
    rows, pos = _index(prepared)
    layers_ = _resolve_layers(adapter, layers)
    rec = Recording()

    def make_hook(layer: int):
        def hook(x: torch.Tensor, start: int) -> None:  # [B, n, d]: prompt positions start..T-1
            here = pos - start  # the image positions within this pass
            o_det = x[rows, here].detach().float()  # [B, P, d]
            rec.activations[layer] = REDUCTIONS[reduce](o_det) if reduce else o_det
            if layer == layers_[0]:
                rec.passes += 1
            if with_grad and not x.requires_grad:
                raise RuntimeError("record(with_grad=True) needs the forward pass under torch.enable_grad()")
            if with_grad:

                def catch(grad: torch.Tensor) -> None:
                    g = grad[rows, here].float()
                    if reduce:
                        rec.gradcam[layer] = REDUCTIONS[reduce](o_det * g)
                    else:
                        rec.gradients[layer] = g
                        rec.gradcam[layer] = o_det * g

                x.register_hook(catch)
            return None

        return hook

    with contextlib.ExitStack() as stack:
        if with_grad:
            stack.enter_context(gradient_anchor(adapter, prepared))
        stack.enter_context(attached(adapter, {(site, layer): make_hook(layer) for layer in layers_}, prepared))
        yield rec


@dataclass
class LayerEdit:
    """An intervention on some units of one layer's site tensor at every image position, per batch row.

    ``units``: long [U], the units edited, or None for all of them (a whole-state patch). Applied in order:
    ``scale`` (float [B] or scalar), ``set_to`` (float [B], scalar, or [B, P, U] values per row, position and
    unit), ``add`` (float [B, P], one value per row and position shared by the units as in METHOD.md's
    v in R^P, or [B, P, U] per unit). ``row_mask``: bool [B, U] (or [B]), which rows (and units) are edited
    (default all), so each row can carry its own neuron set.
    """

    units: torch.Tensor | None
    add: torch.Tensor | None = None
    scale: torch.Tensor | float | None = None
    set_to: torch.Tensor | float | None = None
    row_mask: torch.Tensor | None = None
    applied: int = 0  # passes this edit changed (prefill only: one per forward of the prepared batch)

    def apply(self, o: torch.Tensor) -> torch.Tensor:
        """New values for o [B, P, U] (the selected units at image positions)."""
        new = o
        if self.scale is not None:
            new = new * _per_row(self.scale, o)
        if self.set_to is not None:
            new = torch.zeros_like(new) + _per_row(self.set_to, o)
        if self.add is not None:
            add = self.add.to(o.device, o.dtype)
            new = new + (add[..., None] if add.dim() == 2 else add)
        if self.row_mask is not None:
            mask = self.row_mask.to(o.device)
            new = torch.where(mask[:, None, :] if mask.dim() == 2 else mask[:, None, None], new, o)
        return new


def _per_row(v, o: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=o.dtype, device=o.device)
    return t.view(-1, 1, 1) if t.dim() == 1 else t


@contextmanager
def intervene(adapter: Adapter, prepared: Prepared, edits: dict[int, LayerEdit], site: str = "ffn") -> Iterator[dict[int, LayerEdit]]:
    """Apply ``edits[l]`` to the ``site`` tensor (default O'^l) at the image positions of ``prepared``, in its
    prefill only."""
    rows, pos = _index(prepared)
    _resolve_layers(adapter, edits)

    def make_hook(edit: LayerEdit):
        units = None if edit.units is None else edit.units.to(pos.device)

        def hook(x: torch.Tensor, start: int) -> torch.Tensor:
            x = x.clone()
            here = pos - start  # the image positions within this pass
            if units is None:
                x[rows, here] = edit.apply(x[rows, here])
            else:
                r, p, u = rows[:, :, None], here[:, :, None], units[None, None, :]
                x[r, p, u] = edit.apply(x[r, p, u])
            edit.applied += 1
            return x

        return hook

    with attached(adapter, {(site, layer): make_hook(e) for layer, e in edits.items()}, prepared):
        yield edits


@contextmanager
def everywhere(adapter: Adapter, hooks: dict[tuple[str, int], Callable[[torch.Tensor], torch.Tensor | None]]) -> Iterator[None]:
    """Call ``hooks[(site, l)](x)`` on the tensor x [B, n, d] of hook site ``site`` in layer l on *every* pass, at every
    position: the prompt's, a shared prefix's and each decoding step's (a returned tensor replaces x). This is what a
    weight edit of the site's module computes, applied as a run-time intervention. The hooks are not
    ``prompt_pass_only``, so ``knexp.models.decode_step`` calls the modules they sit on; the shared prefixes' KV
    caches (``knexp.models.prefix_cache``) are forgotten on entry and on exit, so none is computed with the hooks and
    used without them, or the reverse. The hooks are always removed."""
    def before(hook):
        def pre_hook(module, args, kwargs):
            from_kwargs = "hidden_states" in kwargs
            new = hook(kwargs["hidden_states"] if from_kwargs else args[0])
            if new is None:
                return None
            return (args, {**kwargs, "hidden_states": new}) if from_kwargs else ((new, *args[1:]), kwargs)

        return pre_hook

    def after(hook):
        return lambda module, args, output: hook(output)

    lm = adapter.language_model()[0]
    handles = []
    forget(lm)
    try:
        for (site, layer), hook in hooks.items():
            module, when = adapter.site(site, layer)
            handles.append(module.register_forward_pre_hook(before(hook), with_kwargs=True) if when == "pre"
                           else module.register_forward_hook(after(hook)))
        yield
    finally:
        for h in handles:
            h.remove()
        forget(lm)


@contextmanager
def banned(adapter: Adapter, token_ids: list[int]) -> Iterator[None]:
    """Logits of ``token_ids`` set to -inf wherever the LM head runs (every pass and decoding step, knexp's decoding
    and a model's own ``generate`` alike), so greedy decoding never picks them: the decoding-time filter that bans an
    object's word forms. Removed on exit."""
    head = adapter.language_model()[1]
    ids = torch.as_tensor(sorted(set(int(t) for t in token_ids)), dtype=torch.long)

    def mask(module, args, output):
        out = output.clone()
        out[..., ids.to(out.device)] = float("-inf")
        return out

    handle = head.register_forward_hook(mask)
    try:
        yield
    finally:
        handle.remove()
