"""The logit cache: its format (`format`), creating, opening and regrowing it (`store`), checksums
(`integrity`), provenance, manifests, `inspect` and `verify`; and the log-space arithmetic of the
targets it holds (`logmath`), shared by the capture and the losses. Imports `corpus` and `io`.
"""
