"""logit-cache: run a teacher once, cache its top-k predictions in Zarr, distil many students."""

__version__ = "0.1.0"

import warnings as _warnings

# The cache uses numcodecs' Delta and FixedScaleOffset codecs through zarr-python, which warns on
# every read that other Zarr implementations may lack them; that is documented in docs/cache-format.md.
_warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")
