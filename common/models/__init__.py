"""Modules built around stock transformers models (early-exit off-ramps, masked layers)."""
