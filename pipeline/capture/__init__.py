"""The capture: the teacher's forward and top-k in bounded memory (`topk`), shards computed and
written (`shards`). Imports `cache`, `corpus`, `io`, `models`, `distributed`.
"""
