"""Embeddings on Ray Data, made once: the shared embedding service (`service`) and the
frozen-tower cache beside each store (`cache`). Below `bench/`, `serve/` and `train/`."""
