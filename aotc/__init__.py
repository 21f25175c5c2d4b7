"""aotc: ahead-of-time kernel compiler for MLX."""

__version__ = "0.1.0"
