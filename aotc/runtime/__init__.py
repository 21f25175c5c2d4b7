"""The loader: finds aotc libraries and launches their kernels from MLX, with no compiler."""
