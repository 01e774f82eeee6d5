"""knexp: find knowledge neurons in multimodal LLMs and test them by intervention.

Pipeline, one subpackage per stage: ``data`` -> ``counterfactual`` -> ``models`` (adapters, hooks)
-> identification methods -> evaluation -> ``reporting``. Tasks in ``knexp.tasks`` wire stages together
for ``run.py``.
"""

__version__ = "0.1.0"
