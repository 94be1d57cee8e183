"""The exceptions and warnings of neuralreg, in one place (imported by every layer, importing nothing)."""


class InputError(ValueError):
    """Input images, masks or options that cannot be registered (message is one line)."""


class RegistrationDiverged(RuntimeError):
    """The loss became NaN/Inf more often than ``config.max_recoveries`` allowed."""


class RegistrationWarning(UserWarning):
    """A registration finished but is probably wrong (see ``Registration.info["quality"]``)."""


class RegistrationFileError(ValueError):
    """A file that is not a readable neuralreg registration (message is one line)."""


class OutputError(InputError):
    """An output location neuralreg will not write: it exists, holds files neuralreg did not
    write, is the working directory, holds an input, or another run is writing it (one line)."""


class ConfigError(ValueError):
    """An invalid ``RegistrationConfig`` option; ``key`` names it (dotted for nested ones)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


class NativeBuildWarning(UserWarning):
    """A native kernel build that should have worked failed: the PyTorch reference runs instead
    (the message names the compiler's first error and the full log's path)."""
