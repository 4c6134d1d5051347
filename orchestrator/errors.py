"""Errors the CLI turns into one clear line on stderr and a non-zero exit."""


class UserError(Exception):
    """Something the user can fix: bad input, missing file, impossible request."""

    exit_code = 2


class ConfigError(UserError):
    """The config (file or override) is wrong; the message names the dotted path."""


class DataError(UserError):
    """A dataset is missing, truncated or inconsistent; the message names the file."""


class ResourceError(UserError):
    """The cluster cannot provide what the run asked for."""

    exit_code = 3


class NonFiniteLoss(RuntimeError):
    """Raised in a worker when the training loss is NaN or inf (fault_tolerance.on_nonfinite)."""

    def __init__(self, step: int, value: float):
        super().__init__(f"train/loss is {value} at step {step}")
        self.step = step
        self.value = value

    def __reduce__(self):  # crosses process boundaries (Ray) intact
        return (NonFiniteLoss, (self.step, self.value))
