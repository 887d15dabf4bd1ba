"""``python -m bench``: performance ratios measured side by side in one run (see README)."""
