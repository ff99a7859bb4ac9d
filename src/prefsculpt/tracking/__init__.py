"""MLflow: tracking URI, stage runs, config/dataset logging (and later models and the registry)."""

from prefsculpt.tracking.runs import (
    git_commit,
    log_config,
    log_pairs_input,
    pairs_digest,
    resolve_tracking_uri,
    stage_run,
)

__all__ = ["git_commit", "log_config", "log_pairs_input", "pairs_digest", "resolve_tracking_uri", "stage_run"]
