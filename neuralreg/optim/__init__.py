"""Fitting a pair: point sampling, the global search, the affine stage and the optimizer.

``points`` (voxel samplers, edge weights), ``search`` (global rotations + FFT
translation), ``pair`` (``register_pair`` on ``Image`` s: the affine stage, the pyramid of
field stages, the watchdog, the self-check).
"""
