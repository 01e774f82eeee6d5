"""knexp's single entry point: ``python run.py [task=...] [group=option ...]`` (see conf/config.yaml)."""

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from knexp.config import metric_value, register_resolvers, setup_runtime
from knexp.job import Session

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    setup_runtime(cfg)
    task = instantiate(cfg.task, _convert_="all")  # conf/task/<name>.yaml names the task's class by _target_
    result = task(Session.from_config(cfg))
    return metric_value(result, cfg.get("optimized_metric"))  # what an optimising sweeper (Optuna) reads


if __name__ == "__main__":
    main()
