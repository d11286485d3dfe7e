"""The conformance suite: OPS.md as executable cases, run against any backend on any device."""
