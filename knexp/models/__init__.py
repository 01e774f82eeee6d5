"""Models: everything that knows how a model is built and run. Sub-packages and modules, bottom up (no module imports
from a layer above its own; ``tests/test_structure.py`` checks it):

  ``errors``, ``geometry``, ``prepared``  what every model shares: its errors, its image-token layout, a prepared batch;
  ``decoding``                            greedy decoding that reuses what an intervention cannot change;
  ``adapters``                            the protocol methods and evaluation use, and the adapters of each model shape;
  ``hooks``                               instrumentation: recording and patching activations, banned tokens;
  ``weight_edit``                         a weight edit of the FFNs, applied and restored, and its file format;
  ``zoo``, ``tiny``                       model builders and their loaders: the embedded model, MiniGPT-4, tiny models;
  ``captioning``, ``registry``            cached captions, and ``load_model`` for a model's config.
"""
