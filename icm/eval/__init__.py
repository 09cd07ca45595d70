"""Evaluation: inputs, variants, scoring, statistics, report."""
