"""A job: the composed config turned into plain objects, the resources they share, and knexp's Python API.

``compose``    Hydra's composition outside a run (notebooks, tests), the config folders a job was composed from, and a
               config group's option by name;
``spec``       ``JobSpec``: every group of the composed config built and checked before anything is loaded;
               ``JobSpec.named`` builds any group's option by name against the job's config;
``resources``  ``Resources``: what is built once and shared (the data, the model, the caches, the live window, the
               reference statistics);
``session``    ``Session``: the stages on a spec and its resources, given to ``run.py``'s tasks and to notebooks
               (``session``), and ``build_job``.
"""
