"""Kernel sources (C++/CUDA), installed as ``neuralreg._kernels``; compiled on first use by
``neuralreg.fields.native``."""
