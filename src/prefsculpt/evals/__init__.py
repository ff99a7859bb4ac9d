"""Evaluations of a policy against the base (METHOD §6): sycophancy, style, capability, concept shift.

Entry point: ``prefsculpt.evals.stage.run_evaluate(cfg)``; config schema ``evals.config.EvalConfig``.
"""
