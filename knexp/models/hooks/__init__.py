"""Instrumentation at the adapter's hook sites (``Adapter.sites``), each a tensor [B, T, d] per decoder layer l, e.g.
``ffn`` (O^l [B, T, d_f], the neuron activations; docs/method.md, "Notation"), ``resid_pre`` (the residual stream
entering layer l) and ``ffn_act`` (act(gate(x)), Pan et al.'s hook point).

``attach``     the one place hooks are registered: on a prepared prompt's pass only (``attached``, with its prefill
               guard), or on every pass (``everywhere``: what a weight edit computes); the gradient anchor;
``record``     activations (and gradients) at the image tokens;
``intervene``  activation patches at the image tokens, in the prompt's pass only;
``banned``     tokens that greedy decoding may never emit.
Every hook is removed when its ``with`` block ends, also on an exception.
"""
