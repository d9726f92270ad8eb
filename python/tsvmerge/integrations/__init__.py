"""tsvmerge inside other merging tools.

- `tsvmerge.integrations.mergekit`: the `tsv` merge method for mergekit (0.1.4 and 0.1.5)
  and the `tsvmerge-mergekit` command, mergekit's own YAML runner with it registered.
- `tsvmerge.integrations.fusion_bench`: FusionBench algorithms (`TSVMerge`, `TSVCompress`,
  `TSVInterference`) and their Hydra configs (`tsvmerge config-dir fusion_bench`).

Each module imports its tool on import; install the extras `[mergekit]` or `[fusionbench]`.
"""
import os

CONFIG_DIRS = {"fusion_bench": os.path.join(os.path.dirname(os.path.abspath(__file__)), "fusion_bench_config")}


def config_dir(tool: str) -> str:
    """The folder of configs shipped for `tool` (a Hydra --config-dir for FusionBench)."""
    if tool not in CONFIG_DIRS:
        raise ValueError(f"no configs shipped for {tool!r}; choose one of {', '.join(CONFIG_DIRS)}")
    return CONFIG_DIRS[tool]
