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


class StoreError(UserError):
    """The tracking store cannot be used where it is: not a directory, not writable, corrupt, absent."""


class StoreFull(StoreError):
    """A write found no room: the disk is full, or a size limit was reached."""

    exit_code = 1  # not bad input


class NonFiniteLoss(RuntimeError):
    """Raised in a worker when the training loss is NaN or inf (fault_tolerance.on_nonfinite)."""

    def __init__(self, step: int, value: float):
        super().__init__(f"train/loss is {value} at step {step}")
        self.step = step
        self.value = value

    def __reduce__(self):  # crosses process boundaries (Ray) intact
        return (NonFiniteLoss, (self.step, self.value))


class SilentCorruption(RuntimeError):
    """Data-parallel replicas disagree: their weights or optimizer state differ after `step` steps."""

    def __init__(self, step: int, suspects: list[int], checksums: list[int]):
        super().__init__(f"replicas disagree after step {step}: rank(s) {', '.join(map(str, suspects))} "
                         f"differ from the others (checksums {checksums})")
        self.step, self.suspects, self.checksums = step, suspects, checksums

    def __reduce__(self):  # crosses process boundaries (Ray) intact
        return (SilentCorruption, (self.step, self.suspects, self.checksums))


class UserCodeError(RuntimeError):
    """The user's own training code raised: one line naming their frame, and their traceback."""

    def __init__(self, message: str, user_traceback: str = ""):
        super().__init__(message)
        self.user_traceback = user_traceback

    def __reduce__(self):  # crosses process boundaries (Ray) intact
        return (UserCodeError, (str(self), self.user_traceback))
