"""Datasets, scorers and the async runner that queries OpenAI-compatible endpoints."""
