"""Errors a user can cause and fix.

The CLI prints a :class:`PyrovaeError` as one line and exits non-zero; anything
else is a bug and keeps its traceback.
"""


class PyrovaeError(ValueError):
    """A problem with the user's input, stated with what to do about it."""


class DataError(PyrovaeError):
    """A data set that cannot be read or does not fit the model."""


class ContractError(PyrovaeError):
    """A model or guide that breaks the model/guide contract (see the README)."""


class Interrupted(Exception):
    """Training was asked to stop (SIGINT, SIGTERM) and stopped cleanly after a checkpoint.

    ``code`` is the exit status a shell expects for the signal: 130 (SIGINT) or 143 (SIGTERM);
    ``stopped`` says where training stopped, ``run_path`` is the run folder to resume.
    """

    def __init__(self, stopped: str, code: int, run_path=None):
        super().__init__(stopped if run_path is None else f"{stopped}; resume the run in {run_path}")
        self.stopped, self.code, self.run_path = stopped, code, run_path
