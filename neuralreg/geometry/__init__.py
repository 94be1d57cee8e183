"""Geometry: coordinate conventions, images, interpolation, transforms and resampling.

``coordinates`` (voxel / world mm / normalized conventions), ``image`` (``Image``: data
and its voxel-to-world affine), ``interpolation`` (sampling at voxel points), ``transforms``
(``AffineTransform``, ``DisplacementField``, ``map_grid``, ``sample_world``, ``resample``).
Imports nothing of the package outside this folder.
"""
