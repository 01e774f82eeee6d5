"""Tasks that ``run.py`` runs: each ``conf/task/<name>.yaml`` names its class here by ``_target_``. A task is called
with the job's ``knexp.job.session.Session``: it reads the session, calls the stages, writes the outputs and returns a
dict of results. No task imports another (``task=tune`` gets its evaluation job from its config)."""
