"""Small shared pieces every package may use (no MLflow, no stage logic)."""
