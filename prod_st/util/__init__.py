"""Shared plumbing: errors, paths and atomic writes, locks, ranks, progress, precision, cost lines, cache keys, the Hub API, model loading."""
