"""Sharing a run: the student on the Hub (push) and its teacher scores as a dataset (export)."""
