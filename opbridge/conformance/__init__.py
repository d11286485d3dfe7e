"""The conformance suite: OPS.md as executable cases, run against any backend on any device.

- ``data/cases_*.json``: the cases (model shapes at ``small`` and ``full`` tiers, edge cases, bad
  inputs); ``catalogue`` resolves them and adds a determinism twin per op.
- ``inputs/``: one generator per op (random data on the target device); ``mutations``: bad inputs.
- ``oracle``: the reference backend on float64 copies of the (de-quantized) inputs;
  ``metrics`` + ``compare``: OPS.md section 5, thresholds in ``data/thresholds.json``, per-backend
  expected failures and loosened thresholds (with reasons) in ``data/exceptions.json``.
- ``execute.run_case`` runs one case in-process; ``runner`` runs many, one op family per
  subprocess, so a crash or hang is one case's error.
- ``report`` / ``merge``: report.json, report.md and the scoreboard; ``cli``: ``opbridge conformance``;
  ``plugin`` + ``test_conformance``: ``pytest --pyargs opbridge.conformance --opbridge-backend=B``.
- ``bench/`` + ``bench_cli``: ``opbridge bench``.
"""
