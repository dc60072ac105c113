"""Data: the synthetic world, TFDS builders, the grain input pipeline, tokenizer and preprocessing."""
