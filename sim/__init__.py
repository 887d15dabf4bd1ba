"""Experiment running, comparisons and plots."""
