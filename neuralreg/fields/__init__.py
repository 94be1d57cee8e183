"""The neural fields: Phi(x) = x + MLP(enc(x)) and the global affine part.

``field`` (``NeuralField``), ``affine`` (``AffineMap``, ``ComposedMap``), ``encoding``
(``HashGridEncoding``: the backend is chosen once, here), ``hashgrid`` (the tcnn layout
formulas every backend shares), ``reference`` (pure PyTorch, the ground truth),
``native`` (the C++/CUDA kernels of ``cuda_kernels/``), ``tcnn`` (tinycudann).
"""
