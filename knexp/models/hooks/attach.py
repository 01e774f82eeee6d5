"""Registering hooks at hook sites: on a prepared prompt's pass only (``attached``) or on every pass (``everywhere``).

``attached`` takes ``(site, layer)`` keys for input and output sites alike, and gives each hook the tensor and where
its pass starts in the prompt (``start``: x[:, j] is prompt position start + j). Its one prefill guard lets a hook act
only on a pass of the prepared prompt that covers the image tokens (``Prepared.pass_start``): cached decoding steps and
a shared prefix computed alone are untouched, so an intervention reaches generation through the KV cache alone.
``everywhere`` is its unguarded twin: hooks on every pass at every position (the prompt, a shared prefix, each decoding
step), which is what a weight edit changes (``knexp.editing``: the exactness check). Hooks are always removed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from knexp.models.adapters.adapter import Adapter
from knexp.models.decoding.prefix_cache import forget
from knexp.models.prepared import Prepared

# (x [B, n, d], the pass's first prompt position) -> new x or None
Hook = Callable[[torch.Tensor, int], "torch.Tensor | None"]
Call = Callable[[torch.Tensor], "torch.Tensor | None"]  # x [B, n, d] -> new x or None


def _module_hook(when: str, call: Call, prompt_pass_only: bool):
    """A torch module hook that hands ``call`` the site's tensor: the module's input (``when="pre"``, the first
    positional or ``hidden_states`` argument) or its output (``"post"``); a returned tensor replaces it.
    ``prompt_pass_only`` tells ``knexp.models.decoding.decode_step`` that the hook acts on a prompt's pass only."""
    if when == "pre":
        def hook(module, args, kwargs):
            from_kwargs = "hidden_states" in kwargs
            new = call(kwargs["hidden_states"] if from_kwargs else args[0])
            if new is None:
                return None
            return (args, {**kwargs, "hidden_states": new}) if from_kwargs else ((new, *args[1:]), kwargs)
    else:
        def hook(module, args, output):
            return call(output)
    if prompt_pass_only:
        hook.prompt_pass_only = True
    return hook


def _register(module: nn.Module, when: str, hook):
    if when == "pre":
        return module.register_forward_pre_hook(hook, with_kwargs=True)
    return module.register_forward_hook(hook)


def _first_position(kwargs: dict) -> int | None:
    """The first position a decoder layer is given (``position_ids`` [B, n], sequence positions), or None: a layer
    given none, or multimodal positions [3, B, n], whose first entry is no sequence index."""
    pos = kwargs.get("position_ids")
    return int(pos[0, 0]) if isinstance(pos, torch.Tensor) and pos.dim() == 2 and pos.numel() else None


class _PassStarts:
    """Where the pass each decoder layer is running starts in the prompt ``prefill``: the prefill guard of ``attached``.
    A pass shorter than the span from the first image token to the prompt's end holds no image token (a decoding step).
    Only a model with fast paths runs passes that start after a shared prefix (or compute one alone): for it, each
    layer's pass start is read from its inputs; a model without them runs the prompt whole (from 0) and one position per
    decoding step, and the length tells them apart."""

    def __init__(self, adapter: Adapter, prefill: Prepared):
        self.prefill, self.located = prefill, adapter.fast_paths
        self.shortest = prefill.prompt_len - prefill.first_image
        self.starts: dict[int, int | None] = {}  # by layer, while the layer runs (None: no pass of the prompt)

    def watch(self, layer_module: nn.Module, layer: int) -> list:
        """Hooks on decoder layer ``layer`` that note its pass start on entry and forget it on exit (they change
        nothing)."""
        def locate(module, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            short = x.shape[1] < self.shortest
            self.starts[layer] = None if short else self.prefill.pass_start(x.shape[1], _first_position(kwargs))

        def leave(module, args, output):
            self.starts[layer] = None

        locate.prompt_pass_only = leave.prompt_pass_only = True
        return [layer_module.register_forward_pre_hook(locate, with_kwargs=True, prepend=True),
                layer_module.register_forward_hook(leave, always_call=True)]

    def start_of(self, layer: int, x: torch.Tensor) -> int | None:
        """The prompt position of x[:, 0] when x belongs to a pass of the prompt that ends where the prompt does, else
        None."""
        if x.shape[1] < self.shortest:
            return None
        if not self.located:
            return self.prefill.pass_start(x.shape[1])
        start = self.starts.get(layer)
        return start if start is not None and start + x.shape[1] == self.prefill.prompt_len else None


@contextmanager
def attached(adapter: Adapter, hooks: dict[tuple[str, int], Hook], prefill: Prepared) -> Iterator[None]:
    """Call ``hooks[(site, l)](x, start)`` on the tensor x [B, n, d] of hook site ``site`` in layer l (``Adapter.site``)
    during each pass of the prepared prompt ``prefill``: an input site's hook runs before its module uses x, an output
    site's after the module made it; a returned tensor replaces x. ``start`` is the prompt position of x[:, 0]
    (``_PassStarts``). Other passes (a decoding step, a shared prefix computed alone) are not seen: the one prefill
    guard. The hooks are marked ``prompt_pass_only``, so ``knexp.models.decoding.decode_step`` may compute a step
    without calling the modules they sit on. The hooks are always removed."""
    starts = _PassStarts(adapter, prefill)

    def guarded(hook: Hook, layer: int) -> Call:
        def call(x: torch.Tensor):
            start = starts.start_of(layer, x)
            return hook(x, start) if start is not None else None

        return call

    handles = []
    try:
        for layer in sorted({layer for _, layer in hooks}) if starts.located else ():  # pass starts, before the sites
            handles += starts.watch(adapter.decoder_layers()[layer], layer)
        for (site, layer), hook in hooks.items():
            module, when = adapter.site(site, layer)
            handles.append(_register(module, when, _module_hook(when, guarded(hook, layer), prompt_pass_only=True)))
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


def hooks_changed(adapter: Adapter) -> None:
    """Say that what ``everywhere``'s hooks compute has changed while they are attached (an edit being fitted): the
    shared prefixes' KV caches computed under the hooks as they were are forgotten."""
    forget(adapter.language_model()[0])


@contextmanager
def everywhere(adapter: Adapter, hooks: dict[tuple[str, int], Call]) -> Iterator[None]:
    """Call ``hooks[(site, l)](x)`` on the tensor x [B, n, d] of hook site ``site`` in layer l on *every* pass, at every
    position: the prompt's, a shared prefix's and each decoding step's (a returned tensor replaces x). This is what a
    weight edit of the site's module computes, applied as a run-time intervention. The hooks are not
    ``prompt_pass_only``, so ``knexp.models.decoding.decode_step`` calls the modules they sit on; the shared prefixes'
    KV caches (``knexp.models.decoding.prefix_cache``) are forgotten on entry and on exit, so none is computed with the
    hooks and used without them, or the reverse. The hooks are always removed."""
    lm = adapter.language_model()[0]
    handles = []
    forget(lm)
    try:
        for (site, layer), hook in hooks.items():
            module, when = adapter.site(site, layer)
            handles.append(_register(module, when, _module_hook(when, hook, prompt_pass_only=False)))
        yield
    finally:
        for h in handles:
            h.remove()
        forget(lm)
