"""Shared plumbing for the compress-bert research scripts (caching, loops, distributed, plots)."""
