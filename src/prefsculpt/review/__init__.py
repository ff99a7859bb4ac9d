"""The review page: a person reads the audit's hypotheses and decides, concept by concept, what
training may learn (METHOD §4). Pure page building, data shaping and validation; the ``review``
stage (``prefsculpt.stages.review``) fetches the audit from MLflow and logs what is saved."""
