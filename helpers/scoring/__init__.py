"""Scoring: the held-out evaluation, POPE and MMStar, and the typed-vs-spoken comparison."""
