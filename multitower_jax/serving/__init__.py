"""Serving: the jitted batched scorer (scorer), eCPM ranking, the user-embedding cache (cache),
the micro-batcher (batcher), the request path (ranker) and the portable scorer (portable).

Modules are imported on use: `experiments/base.py` reads `serving.settings` without pulling in JAX.
"""
