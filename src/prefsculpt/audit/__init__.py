"""The audit: statistical concept hypotheses with error control, labels, decisions."""
