"""One error type for everything a user can get wrong: a problem and its fix, printed as one line."""

from __future__ import annotations


class QftError(Exception):
    """A user-facing error. ``str(err)`` is one line: what is wrong, then how to fix it."""

    def __init__(self, problem: str, fix: str):
        self.problem = problem.rstrip(".")
        self.fix = fix.rstrip(".")
        super().__init__(f"{self.problem}. Fix: {self.fix}.")


class QftInterrupted(QftError):
    """Training stopped on a signal after saving a checkpoint; the fix says how to resume.

    ``exit_code`` follows the shell's convention, 128 + the signal number (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, problem: str, fix: str, signum: int):
        super().__init__(problem, fix)
        self.exit_code = 128 + signum
