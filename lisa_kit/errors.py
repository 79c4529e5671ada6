"""Typed exceptions of lisa_kit.

Everything lisa_kit raises on purpose is a :class:`LisaKitError`; the CLI prints those
as one ``error: ...`` line instead of a traceback. Messages name the thing to fix
(component kind and name, recipe key and file, plugin distribution).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence


def _rebuild(cls, args, state):
    err = cls.__new__(cls)
    err.args = args
    err.__dict__.update(state)
    return err


class LisaKitError(Exception):
    """Base class of every error lisa_kit raises deliberately."""

    def __reduce__(self):
        # Subclasses take structured constructor arguments, so the default
        # ``cls(*args)`` unpickling would fail (e.g. in DataLoader workers).
        return _rebuild, (type(self), self.args, self.__dict__)


class UnknownComponentError(LisaKitError, KeyError):
    """No component of ``kind`` is registered under ``name``."""

    def __init__(self, kind: str, name: str, available: Iterable[str], hint: str = ""):
        self.kind = kind
        self.name = name
        self.available = sorted(available)
        names = ", ".join(self.available) if self.available else "(none registered)"
        message = f"unknown {kind} {name!r}; available {kind} components: {names}"
        if hint:
            message += f". {hint}"
        super().__init__(message)

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message, adding quotes.
        return str(self.args[0])


class UnknownKindError(UnknownComponentError):
    """``kind`` is not one of :data:`lisa_kit.interfaces.KINDS`."""

    def __init__(self, kind: str, kinds: Sequence[str]):
        LisaKitError.__init__(self, f"unknown component kind {kind!r}; kinds are: {', '.join(kinds)}")
        self.kind = kind
        self.name = None
        self.available = list(kinds)


class DuplicateComponentError(LisaKitError):
    """Two plugins register the same ``(kind, name)``.

    ``first`` and ``second`` describe the providers, e.g. ``"fakeplugin 1.0 (plugin 'fake')"``.
    """

    def __init__(self, kind: str, name: str, first: str, second: str):
        self.kind = kind
        self.name = name
        self.first = first
        self.second = second
        super().__init__(
            f"duplicate component {kind}:{name}: provided by both {first} and {second}; "
            "uninstall one of them or rename the component in one plugin"
        )


class PluginError(LisaKitError):
    """A plugin registered at runtime (:meth:`Registry.register`) is broken."""


class PluginWarning(UserWarning):
    """An installed plugin failed to load; the others keep working."""


class RecipeError(LisaKitError):
    """A recipe cannot be found, loaded, overridden or validated.

    ``key`` is the dotted recipe key and ``file`` the recipe file (or override) it came
    from; both are part of the message. ``problems`` lists every problem when
    validation found several.
    """

    def __init__(self, message: str, *, key: str | None = None, file: str | None = None,
                 problems: Sequence[str] = ()):
        self.key = key
        self.file = str(file) if file is not None else None
        self.problems = list(problems)
        prefix = "".join(f"{part}: " for part in (self.file, key) if part)
        super().__init__(prefix + message)


class CheckpointError(LisaKitError):
    """Weights cannot be read or do not fit the components they are loaded into.

    ``component`` (e.g. ``"mask_decoder:sam"``), ``key`` (a state-dict key or recipe
    key) and ``file`` are optional and appended to the message when given.
    """

    def __init__(self, message: str, *, component: str | None = None, key: str | None = None,
                 file: str | None = None):
        self.component = component
        self.key = key
        self.file = str(file) if file is not None else None
        details = [f"{label}: {value}" for label, value in
                   (("component", component), ("key", key), ("file", self.file)) if value]
        super().__init__(message + (f" ({'; '.join(details)})" if details else ""))


class DataError(LisaKitError):
    """A dataset file is missing, unreadable or malformed.

    ``path`` is the file and ``field`` the annotation field at fault, when known; both
    are part of the message, so a user can open the file and fix it.
    """

    def __init__(self, message: str, *, path=None, field: str | None = None):
        self.path = str(path) if path is not None else None
        self.field = field
        details = [f"{label}: {value}" for label, value in (("file", self.path), ("field", field)) if value]
        super().__init__(message + (f" ({'; '.join(details)})" if details else ""))


class ImageError(DataError):
    """An image cannot be decoded (corrupt, truncated, not an image, unsupported mode)."""


class InputError(LisaKitError, ValueError):
    """A request cannot be served as given (empty prompt, prompt too long, bad argument)."""


class TrainingError(LisaKitError):
    """Training cannot go on as configured (e.g. a non-finite loss under ``train.nonfinite: stop``)."""


class EvaluationError(LisaKitError):
    """Scoring failed while evaluating (under ``torch.distributed``: this rank's error, raised
    typed so every rank stops together)."""


class RankFailedError(LisaKitError):
    """Another rank of a distributed run failed (its own error says why): raised on the ranks
    that did not, instead of leaving them waiting in a collective the failed rank never
    joins. ``ranks``: the ranks that failed."""

    def __init__(self, message: str, *, ranks: list[int]):
        self.ranks = ranks
        super().__init__(message)


class ImageSizeError(ImageError):
    """An image is outside the intake's limits (:class:`lisa_kit.images.ImageLimits`): too
    many pixels or too extreme an aspect ratio. ``size`` is ``(H, W)`` when known and
    ``limit`` ``(name, value)`` of the limit it broke; both are in the message."""

    def __init__(self, message: str, *, path=None, size: tuple[int, int] | None = None,
                 limit: tuple[str, float] | None = None):
        self.size = size
        self.limit = limit
        super().__init__(message, path=path)


class InsufficientMemoryError(CheckpointError):
    """A checkpoint would not fit the free memory of the device it is to be loaded on
    (estimated from its headers before anything is read)."""
