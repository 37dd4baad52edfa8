"""Runnable experiments: ``python -m keras_seht.experiments.demo``."""
