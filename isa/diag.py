"""Errors a user can act on, shared by every layer of cimc.

`CimcError` carries one line of text that names what is wrong and where; the CLI prints it
and exits with status 2. Parse errors add the offending source line and a caret.
"""

from __future__ import annotations


class CimcError(Exception):
    """A user-facing error: bad input, an unsupported model, an invalid option."""

    def __init__(self, message: str, *, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def render(self) -> str:
        """The message, plus any multi-line detail (source excerpt, list of nodes)."""
        return self.message if not self.detail else f"{self.message}\n{self.detail}"


def caret_excerpt(text: str, line: int, column: int) -> str:
    """Return the 1-based `line` of `text` and a caret under 1-based `column`."""
    lines = text.splitlines()
    if not 1 <= line <= len(lines):
        return ""
    src = lines[line - 1]
    return f"  {src}\n  {' ' * (max(column, 1) - 1)}^"


class SourceError(CimcError):
    """An error at a position in a text file, rendered as `file:line:col: message`."""

    def __init__(self, path: str, text: str, line: int, column: int, message: str) -> None:
        super().__init__(f"{path}:{line}:{column}: {message}", detail=caret_excerpt(text, line, column))
        self.path, self.line, self.column = path, line, column
