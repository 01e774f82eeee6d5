"""Models: the embedded MLLM built from offline packages, real-size LLaVA-1.5 and MiniGPT-4, tiny test models.

Layers, bottom up (no module imports from a layer above its own):
  ``errors``, ``geometry``, ``batching``,  what every model shares: its errors, its image-token layout, batching,
  ``decoding``                             greedy decoding that reuses what an intervention cannot change;
  ``adapter``                              the protocol methods and evaluation use (structure, hook sites, prompts);
  ``spliced``, ``llava``                   the adapters of the two model shapes;
  ``embedded``, ``minigpt4``, ``tiny``     model builders and their loaders;
  ``hooks``, ``captioning``, ``registry``  instrumentation, cached captions, and ``load_model`` for a model's config.
"""
