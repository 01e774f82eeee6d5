"""knexp's single entry point: ``python run.py [task=...] [group=option ...]`` (see conf/config.yaml)."""

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from knexp.config import metric_value, register_resolvers, setup_runtime
from knexp.console import heartbeat
from knexp.job.session import build_job
from knexp.user_errors import UserError

register_resolvers()
log = logging.getLogger("knexp")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        setup_runtime(cfg)
        # every setting is checked here, before any model is loaded: conf/task/<name>.yaml names the task's class by
        # _target_
        task, session = build_job(cfg)
        with heartbeat():  # a line at least every 20 s, also inside a long phase
            result = task(session)
        return metric_value(result, cfg.get("optimized_metric"))  # what an optimising sweeper (Optuna) reads
    except UserError as exc:  # expected: bad data, missing weights, a setting that cannot work
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = f"{exc} (HYDRA_FULL_ERROR=1 shows the traceback)"
        print(f"knexp: error: {message}", file=sys.stderr)
        record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
        for handler in logging.getLogger().handlers:  # the job's log file too (the console has it already)
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
        sys.exit(1)


if __name__ == "__main__":
    main()
