"""The front door: ``neuralreg.register_pair`` takes images or paths of image files.

It sits above ``io`` (it reads files) and below the CLI; the optimizer itself
(``neuralreg.optim.pair.register_pair``) takes ``Image`` s only and never imports ``io``.
"""

from __future__ import annotations

import os

from neuralreg.geometry.image import Image
from neuralreg.io import read_image
from neuralreg.optim import pair
from neuralreg.result import Registration


def _read(value, name: str):
    if isinstance(value, str | os.PathLike):
        return read_image(value, f"{name} image")
    return value


def register_pair(
    moving: Image | str | os.PathLike,
    fixed: Image | str | os.PathLike,
    config=None,
    moving_mask: Image | str | os.PathLike | None = None,
    fixed_mask: Image | str | os.PathLike | None = None,
) -> Registration:
    """Register ``moving`` (A) to ``fixed`` (B) with two neural fields.

    ``moving``, ``fixed`` and the masks may be ``Image`` s or paths of image files (read
    with ``io.read_image``); ``config`` a ``RegistrationConfig``, a dict of its keys or
    None (defaults). Everything else is ``neuralreg.optim.pair.register_pair``'s: see there
    for the loss, the returned ``Registration``, ``InputError``/``RegistrationDiverged`` and
    the ``RegistrationWarning`` of a doubtful result.
    """
    masks = [None if m is None else _read(m, n) for m, n in ((moving_mask, "moving_mask"), (fixed_mask, "fixed_mask"))]
    return pair.register_pair(_read(moving, "moving"), _read(fixed, "fixed"), config, *masks)


__all__ = ["register_pair"]
