"""knexp: find knowledge neurons in multimodal LLMs and test them by intervention.

Pipeline, one subpackage per stage: ``data`` -> ``counterfactual`` (inpainting) -> ``models`` (adapters, hooks) ->
``identification`` (methods) -> ``editing`` -> ``evaluation`` -> ``reporting``. ``knexp.job`` builds a job's objects
from the composed config once; the tasks in ``knexp.tasks`` run the stages for ``run.py``. The method they compute is
``docs/method.md``. From Python::

    import knexp
    s = knexp.session("model=embedded", "knowledge=banana")
    found = s.identify(method="ours")
"""

__version__ = "0.1.0"


def session(*overrides: str, output_dir=None):
    """A ``knexp.job.session.Session`` for the config ``overrides`` compose (``knexp.job.session.session``)."""
    from knexp.job.session import session as _session

    return _session(*overrides, output_dir=output_dir)
