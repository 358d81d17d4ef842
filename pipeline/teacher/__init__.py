"""The default teacher: a small Llama trained on the corpus (`train`), for the demo pipeline."""
