"""Pure-Python readers for compiled kernel containers: Metal libraries and CUDA fatbins."""
