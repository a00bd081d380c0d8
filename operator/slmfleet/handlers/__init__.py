"""Thin kopf handlers: parse, call the pure layers, apply, write status."""
