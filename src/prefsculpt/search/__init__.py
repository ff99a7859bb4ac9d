"""Optuna search over concept shaping (``search`` stage) and promotion to the registry (``promote``)."""
