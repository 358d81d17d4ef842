"""The corpus: sources cut into units (`sources`), chat rendering and loss masks (`chat`, `loss_mask`),
the tokenizer (`tokenizer`), tokenization on worker processes (`tokenize`) and the token store
(`token_store`). Imports `io` only.
"""
