"""The exceptions and warnings of neuralreg, in one place (imported by every layer, importing nothing)."""


class InputError(ValueError):
    """Input images, masks or options that cannot be registered (message is one line)."""


class RegistrationDiverged(RuntimeError):
    """The loss became NaN/Inf more often than ``config.max_recoveries`` allowed."""


class RegistrationWarning(UserWarning):
    """A registration finished but is probably wrong (see ``Registration.info["quality"]``)."""


class RegistrationFileError(ValueError):
    """A file that is not a readable neuralreg registration (message is one line)."""
