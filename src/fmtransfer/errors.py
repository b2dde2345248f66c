"""User-facing errors: one line that names the problem and the fix; the CLI exits with code 2."""

from __future__ import annotations


class FmtError(Exception):
    """Base class for errors caused by the user's input (config, data, files), not by a bug."""


class ConfigError(FmtError):
    """A malformed or inconsistent configuration."""


class DataError(FmtError):
    """Missing data package, missing column, or data that does not fit a model."""


class ArtifactError(FmtError):
    """A corrupt or stale checkpoint, cache entry or teacher artifact."""


class TrainingDiverged(FmtError, FloatingPointError):
    """The loss became NaN or inf (a learning rate too high, or non-finite inputs)."""


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """' (did you mean 'x'?)' for the closest of `choices` to a mistyped `word`, else ''."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
