"""Triton kernels (@triton.jit) with thin launchers; tuned launch configurations live beside them as data."""
