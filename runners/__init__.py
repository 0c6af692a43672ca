"""Entry points: `python -m runners.cl` (train a stream) and `python -m runners.bench`."""
