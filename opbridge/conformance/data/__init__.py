"""Conformance data: cases (cases_*.json), thresholds, per-backend exceptions and bench workloads (JSON)."""
