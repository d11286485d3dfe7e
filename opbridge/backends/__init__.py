"""Vendor backends, one folder each. Each registers a :class:`opbridge.core.registry.Backend` on import."""
