"""logit-cache: run a teacher once, cache its top-k predictions in Zarr, distil many students."""

__version__ = "0.1.0"
