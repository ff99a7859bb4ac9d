"""Concepts: SAE training/loading, the Lightning encoder, span scores, named concepts."""
