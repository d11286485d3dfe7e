"""Device kernels, one folder per language. They know tensors and launch grids, not backends or settings."""
