"""User-facing errors: one clear line, exit status 2, no traceback unless --debug."""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix (bad manifest, corrupt file, missing stage output...).

    The message is one line: what went wrong, which case/file, and what to do.
    """

    exit_code = 2

    def __init__(self, message: str, *, case: str | None = None, path: str | None = None, fix: str | None = None):
        self.what, self.fix = message, fix  # the parts, for errors that collect several problems
        parts = []
        if case:
            parts.append(f"case {case}")
        if path:
            parts.append(str(path))
        prefix = (": ".join(parts) + ": ") if parts else ""
        text = prefix + message
        if fix:
            text += f" -> {fix}"
        super().__init__(" ".join(text.split()))


class ManifestError(UserError):
    """The manifest has one or more problems; all are listed."""

    def __init__(self, manifest: str, problems: list[str]):
        self.problems = problems
        head = f"{manifest}: {len(problems)} problem(s) in manifest: " + "; ".join(problems)
        super().__init__(head, fix="fix the manifest and run again")


class Stopped(BaseException):
    """SIGTERM arrived (a job scheduler's cancel, or torchrun ending every rank because one failed).

    A BaseException, like Ctrl-C's KeyboardInterrupt: it unwinds past the stage's error handling, so
    the partial state (``checkpoint_last.pt``, finished cases) stays for the next run to resume.
    """
