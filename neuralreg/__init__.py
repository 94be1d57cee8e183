"""neuralreg: pairwise image registration with neural fields and GradICON."""

from neuralreg.api import register_pair
from neuralreg.config import FieldConfig, HashGridConfig, RegistrationConfig
from neuralreg.errors import InputError, RegistrationDiverged, RegistrationFileError, RegistrationWarning
from neuralreg.fields.encoding import HashGridEncoding, available_backends
from neuralreg.fields.field import NeuralField
from neuralreg.geometry.image import Image
from neuralreg.result import Registration

__version__ = "0.1.0"


def backends() -> dict[str, str]:
    """Hash-grid backends and whether each can run here (``torch``, ``native``, ``tcnn``)."""
    return available_backends()


__all__ = [
    "FieldConfig",
    "HashGridConfig",
    "HashGridEncoding",
    "Image",
    "InputError",
    "NeuralField",
    "Registration",
    "RegistrationConfig",
    "RegistrationDiverged",
    "RegistrationFileError",
    "RegistrationWarning",
    "backends",
    "register_pair",
]
