"""knexp's single entry point: ``python run.py [task=...] [group=option ...]`` (see conf/config.yaml)."""

import hydra
from omegaconf import DictConfig

from knexp.config import register_resolvers, setup_runtime
from knexp.tasks import get_task, metric_value

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    setup_runtime(cfg)
    result = get_task(cfg.task.name)(cfg)
    return metric_value(result, cfg.get("optimized_metric"))  # what an optimising sweeper (Optuna) reads


if __name__ == "__main__":
    main()
