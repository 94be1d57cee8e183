"""Fitting a pair: the run, its global alignment, its stages and the optimizer.

``registration`` (``PairRegistration``, one run from checked images to a ``Registration``),
``inputs`` (the checks before a run), ``alignment`` (rigid starts fitted as affines),
``search`` (global rotations + FFT translation), ``stage`` (one pyramid level: samplers
and loss terms), ``points`` (voxel samplers, edge weights), ``watchdog`` (rollback
guards), ``adam`` (the optimizer).
"""
