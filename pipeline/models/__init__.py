"""Hugging Face causal LMs: where they run (`devices`), building and loading them (`load`), their content
identity (`identity`) and their LM head (`head`)."""

