"""Training students from the cache: the loop (`student`), the stream of batches (`loader`, `order`),
data parallelism (`parallel`), the held-out check (`heldout`) and the training log (`log`).
"""
