"""neuralreg: pairwise image registration with neural fields and GradICON.

The names below load on first use (PEP 562), so that ``import neuralreg.cli`` can set up
the process (OpenMP's wait policy) before torch loads: ``neuralreg.register_pair`` and the
others work as plain attributes.
"""

from __future__ import annotations

import importlib

from neuralreg.version import __version__

_HOMES = {
    "register_files": "neuralreg.api",
    "register_pair": "neuralreg.api",
    "FieldConfig": "neuralreg.config",
    "HashGridConfig": "neuralreg.config",
    "RegistrationConfig": "neuralreg.config",
    "RunConfig": "neuralreg.config",
    "ConfigError": "neuralreg.errors",
    "InputError": "neuralreg.errors",
    "OutputError": "neuralreg.errors",
    "RegistrationDiverged": "neuralreg.errors",
    "RegistrationFileError": "neuralreg.errors",
    "RegistrationWarning": "neuralreg.errors",
    "HashGridEncoding": "neuralreg.fields.encoding",
    "NeuralField": "neuralreg.fields.field",
    "Image": "neuralreg.geometry.image",
    "PairRegistration": "neuralreg.optim.registration",
    "Registration": "neuralreg.result",
}


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'neuralreg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])


def backends() -> dict[str, str]:
    """Hash-grid backends and whether each can run here (``torch``, ``native``, ``tcnn``)."""
    from neuralreg.fields.encoding import available_backends

    return available_backends()


__all__ = [*sorted(_HOMES), "__version__", "backends"]
