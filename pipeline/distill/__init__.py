"""The distillation losses on sparse cached targets: plain (`losses`) and fused (`fused`). Imports
`cache` (the format and its log-space arithmetic) and `corpus` (the loss-mask rule).
"""
