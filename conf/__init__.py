"""The configs (data/*.yaml, ...). `data.splits` is an open node, so `data.splits.test=[test]` adds a role the way
the configs' comments show: Hydra's struct mode would want +data.splits.test=[test]."""
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

_splits = OmegaConf.create({"splits": {}})
OmegaConf.set_struct(_splits.splits, False)  # flags survive Hydra's merges; struct is set on the root only
ConfigStore.instance().store(name="data_splits", node=_splits)
