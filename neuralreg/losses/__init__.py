"""Similarities and regularizers, registered by name: the config, the CLI and the optimizer
read these tables, so a new term is a function here and one entry below.

``SIMILARITIES[name](warped (N,) or (W, k), fixed same) -> scalar`` loss (lower is better);
those in ``BATCHED`` also take leading batch axes, one loss each. Those in ``DESCRIPTORS``
read, instead of the intensities, a volume of C channels made from each image per pyramid
level: their inputs are (N, C).

``REGULARIZERS[name]`` is a ``Regularizer``: ``make(config, box)`` gives the term
``(phi_a, phi_b, u (N, d) normalized points) -> scalar``. An inverse-consistency term
(``fields_only=False``) gets the full maps (affine part included) and is evaluated both
ways, Phi_AB o Phi_BA on moving-domain points and Phi_BA o Phi_AB on fixed-domain points;
a smoothness term (``fields_only=True``) gets the two fields alone and all the points.
``"none"`` switches the regularizer off.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from neuralreg.losses import regularizers
from neuralreg.losses.descriptors import DESCRIPTORS, mind, mind_mi
from neuralreg.losses.similarity import WINDOWED, lncc, lncc_mi, mi, mse, ncc

SIMILARITIES: dict[str, Callable] = {
    "mse": mse,
    "ncc": ncc,
    "lncc": lncc,
    "mi": mi,
    "lncc_mi": lncc_mi,
    "mind": mind,
    "mind_mi": mind_mi,
}
# the similarities that take a batch of samples (leading axes) and give a loss each: the
# affine fits of several starts step together through one call (another function is
# called once a start)
BATCHED: frozenset = frozenset(SIMILARITIES.values())
# the similarities whose values have the data's scale (squared differences), not a bounded
# one: a jump of theirs is judged relative to their best (``watchdog.Watchdog.relative``)
DATA_SCALED: tuple = ("mse", "mind")
# the similarities that hold across contrasts (tissue classes by mutual information, with
# structure by MIND for "mind_mi"): where the fields fit one of them after a windowed first
# stage, the contrast checks run (``registration.PairRegistration._check_contrast``), and a
# first stage that inverted contrasts or lost shared information would pull the wrong way
# fits mutual information instead
CROSS_CONTRAST: tuple = ("mi", "mind_mi")


@dataclass(frozen=True)
class Regularizer:
    make: Callable  # (config, box) -> term(phi_a, phi_b, u)
    fields_only: bool = False
    # (config, box) -> term(phi_ab, phi_ba, u_moving, u_fixed, values_at=None), both ways in
    # one (fewer passes), or None where it does not apply: an inverse-consistency term's two
    # halves at once; with values_at=(v_ab, v_ba) it returns (term, (phi_ab(v_ab), phi_ba(v_ba)))
    # from the same passes (the similarity's points)
    both_ways: Callable | None = None


def _gradicon(cfg, box):
    return regularizers.gradicon_analytic if cfg.jacobian == "analytic" else regularizers.gradicon


def _gradicon_fd(cfg, box):
    step = cfg.fd_step_mm / box.scale

    def term(a, b, u):
        return regularizers.gradicon_fd(a, b, u, step)

    return term


def _gradicon_both_ways(cfg, box):
    if cfg.jacobian != "analytic":
        return None
    return functools.partial(regularizers.gradicon_analytic_both_ways, volume_weight=cfg.volume_weight)


REGULARIZERS: dict[str, Regularizer | None] = {
    "gradicon": Regularizer(_gradicon, both_ways=_gradicon_both_ways),
    "gradicon_fd": Regularizer(_gradicon_fd),
    "icon": Regularizer(lambda cfg, box: regularizers.icon),
    "diffusion": Regularizer(lambda cfg, box: regularizers.diffusion, fields_only=True),
    "bending": Regularizer(lambda cfg, box: regularizers.bending, fields_only=True),
    "none": None,
}

__all__ = [
    "BATCHED",
    "CROSS_CONTRAST",
    "DATA_SCALED",
    "DESCRIPTORS",
    "REGULARIZERS",
    "SIMILARITIES",
    "WINDOWED",
    "Regularizer",
]
