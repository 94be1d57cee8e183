"""neuralreg: pairwise image registration with neural fields and GradICON."""

from .config import FieldConfig, HashGridConfig, RegistrationConfig
from .encoding import HashGridEncoding, available_backends
from .errors import InputError, RegistrationDiverged, RegistrationFileError, RegistrationWarning
from .field import NeuralField
from .image import Image
from .registration import register_pair
from .result import Registration

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
