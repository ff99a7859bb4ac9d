"""Stage orchestration: one module per pipeline stage (MLflow runs, artifacts, inputs)."""
