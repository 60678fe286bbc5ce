"""Training: transformers' Trainer configured once, crash-safe checkpoints, and each training stage's parts that
are not its lesson (the lesson is in the notebook's cells)."""
