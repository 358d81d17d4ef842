"""logit-cache: run a teacher once, cache its top-k predictions in Zarr, distil many students."""

__version__ = "0.1.0"

import warnings as _warnings

# The cache uses numcodecs' Delta and FixedScaleOffset codecs through zarr-python, which warns on
# every read that other Zarr implementations may lack them; that is documented in docs/cache-format.md.
_warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")

# The public library API (docs/api.md), imported on first use so that `pipeline --help` stays instant.
__all__ = ["LogitCache", "CacheDataset", "collate", "distillation_loss", "linear_distillation_loss", "hidden_and_head",
           "LogitHead", "loss_counts", "DistillationLoss", "DistillationTrainer"]
_HOMES = {"DistillationTrainer": "pipeline.hf"}


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_HOMES.get(name, "pipeline.api")), name)
