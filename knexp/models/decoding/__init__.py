"""Greedy decoding that does no work an intervention cannot change: the prompt's pass (``prefill``) over a shared
prefix's KV cache (``prefix_cache``), one decoding step over every row in flight (``decode_step``), continuous batching
(``streaming``) and batch-size fallbacks (``batching``)."""
