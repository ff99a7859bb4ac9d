"""prefsculpt: concept-level audit and shaping of preference optimisation."""
__version__ = "0.1.0"
