"""neuralreg-eval: how neuralreg is measured, kept out of the library.

- ``knee``: the OAI protocol (label maps on the half-resolution grid, synthetic MR, the
  canonical and the realistic-geometry pairs, one scoring of any method's maps);
- ``baselines``: ANTs SyN and elastix B-spline behind one interface;
- ``benchmark``: each (pair, method) in its own process, scored alike, and its tables.

It imports ``neuralreg``; nothing in ``neuralreg`` imports it.
"""
