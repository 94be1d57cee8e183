"""neuralreg: pairwise image registration with neural fields and GradICON."""

from neuralreg.api import register_files, register_pair
from neuralreg.config import FieldConfig, HashGridConfig, RegistrationConfig
from neuralreg.errors import (
    ConfigError,
    InputError,
    OutputError,
    RegistrationDiverged,
    RegistrationFileError,
    RegistrationWarning,
)
from neuralreg.fields.encoding import HashGridEncoding, available_backends
from neuralreg.fields.field import NeuralField
from neuralreg.geometry.image import Image
from neuralreg.result import Registration
from neuralreg.version import __version__


def backends() -> dict[str, str]:
    """Hash-grid backends and whether each can run here (``torch``, ``native``, ``tcnn``)."""
    return available_backends()


__all__ = [
    "ConfigError",
    "FieldConfig",
    "HashGridConfig",
    "HashGridEncoding",
    "Image",
    "InputError",
    "NeuralField",
    "OutputError",
    "Registration",
    "RegistrationConfig",
    "RegistrationDiverged",
    "RegistrationFileError",
    "RegistrationWarning",
    "__version__",
    "backends",
    "register_files",
    "register_pair",
]
