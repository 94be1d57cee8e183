"""The front door: ``register_pair`` takes images or paths of image files, ``register_files``
goes from files to an output folder.

It sits above ``io`` (it reads files) and ``report`` (it writes the output folder) and below
the CLI; the optimizer itself (``neuralreg.optim.registration.PairRegistration``) takes ``Image`` s only
and never imports ``io``. ``register_files`` is the one read -> register -> write path: the
CLI's ``register`` and every pair of ``batch`` go through it.
"""

from __future__ import annotations

import os

from neuralreg.errors import InputError
from neuralreg.files import file_record
from neuralreg.geometry.image import Image
from neuralreg.io import read_image, read_pair
from neuralreg.io.folders import OutputFolder
from neuralreg.optim.registration import PairRegistration
from neuralreg.optim.threads import run_threads
from neuralreg.report.outputs import write_outputs
from neuralreg.result import Registration

INPUT_KEYS = ("fixed", "moving", "fixed_labels", "moving_labels", "fixed_mask", "moving_mask")


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
    run=None,
) -> Registration:
    """Register ``moving`` (A) to ``fixed`` (B) with two neural fields.

    ``moving``, ``fixed`` and the masks may be ``Image`` s or paths of image files (read
    with ``io.read_image``); ``config`` a ``RegistrationConfig``, a dict of its keys or
    None (defaults); ``run`` a ``RunConfig`` (device, threads, progress), a dict of its keys
    or None. Everything else is ``neuralreg.optim.registration.PairRegistration``'s: see there
    for the loss, the returned ``Registration``, ``InputError``/``RegistrationDiverged`` and
    the ``RegistrationWarning`` of a doubtful result.
    """
    masks = [None if m is None else _read(m, n) for m, n in ((moving_mask, "moving_mask"), (fixed_mask, "fixed_mask"))]
    return PairRegistration(_read(moving, "moving"), _read(fixed, "fixed"), config, *masks, run=run).run()


def register_files(
    fixed,
    moving,
    out,
    config=None,
    *,
    run=None,
    fixed_labels=None,
    moving_labels=None,
    fixed_mask=None,
    moving_mask=None,
    modality: str = "mri",
    ct_window=(40.0, 400.0),
    overwrite: bool = False,
    extra_report: dict | None = None,
    input_records: dict | None = None,
) -> tuple[Registration, dict]:
    """Register the image files ``moving`` to ``fixed`` and write the output folder ``out``.

    The folder is checked and locked first (``neuralreg.io.folders.OutputFolder``: nothing
    is registered when it cannot be written, and only a folder neuralreg wrote is replaced,
    with ``overwrite``); the images are read and preprocessed (``io.read_pair``: label maps
    and masks on their image's grid), registered, and every output written whole or not at
    all (``report.outputs.write_outputs``). ``report.json`` records each input's path, size
    and SHA-256 under ``inputs`` (``input_records``: the ``files.file_record`` s the caller
    already took, e.g. ``batch`` to decide whether to register; else they are taken here),
    and ``extra_report``'s entries.

    Returns the ``Registration`` and the report dictionary. Raises ``InputError`` (bad
    input), ``OutputError`` (an output folder it may not write) or ``RegistrationDiverged``.
    """
    paths = dict(zip(INPUT_KEYS, (fixed, moving, fixed_labels, moving_labels, fixed_mask, moving_mask), strict=True))
    with OutputFolder(out, overwrite, inputs=paths.values()) as folder:
        images = read_pair(**paths, modality=modality, ct_window=ct_window)
        records = input_records or {k: file_record(p) for k, p in paths.items() if p is not None}
        try:
            run = PairRegistration(
                images["moving"], images["fixed"], config, images["moving_mask"], images["fixed_mask"], run=run
            )
            reg = run.run()
        except InputError as exc:  # the optimizer names the image, not its file
            raise InputError(_with_path(str(exc), paths)) from None
        changes = (reg.info.get("threads") or {}).get("changes")
        # the outputs on the thread count the run ended on: fewer where other processes are busy
        with run_threads(changes[-1]["threads"] if changes else None):
            report = write_outputs(
                folder,
                reg,
                images["moving"],
                images["fixed"],
                images["moving_labels"],
                images["fixed_labels"],
                extra_report={"inputs": records, **(extra_report or {})},
                original_moving=images["moving_original"],
            )
    return reg, report


def _with_path(message: str, paths: dict) -> str:
    """``message`` with the file's path after the input it begins with (``fixed image``, ``moving mask``...)."""
    for key, path in paths.items():
        name = key.replace("_", " ") + ("" if "_" in key else " image")
        if path is not None and message.startswith(name + " "):
            return f"{name} {path}{message[len(name) :]}"
    return message


__all__ = ["register_files", "register_pair"]
