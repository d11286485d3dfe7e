"""``opbridge bench``: time each op on a device, against the device's ceilings and PyTorch-native peers.

timing (events, median, L2 rotation), costs (FLOP and byte counts per op), ceilings (bf16 / fp8
GEMM, copy bandwidth), peers (what a user would write without opbridge), runner and output
(bench.json, bench.md, bench.png).
"""
