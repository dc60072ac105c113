"""Retrieval: export tower embeddings, a ScaNN index with live updates, targeting-aware search, evaluation."""
