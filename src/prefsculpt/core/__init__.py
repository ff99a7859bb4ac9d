"""The bottom layer: small helpers every other package shares, written once.

``files`` (atomic writes, content digests, model fingerprint), ``paths`` (the cache root),
``names`` (MLflow tag and artifact names), ``device`` (``auto`` → cuda / mps / cpu), ``errors``
(the user-error base class the CLI maps to exit code 2), ``redact`` (secrets out of logged
parameters, keys MLflow accepts).
"""
