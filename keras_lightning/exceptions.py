"""The errors this package raises. Catch :class:`KerasLightningError` to catch them all."""

import difflib


class KerasLightningError(Exception):
    """Base class of every error raised by ``keras_lightning``."""


class BackendError(KerasLightningError, RuntimeError):
    """Keras runs on a backend other than torch."""


class ConfigurationError(KerasLightningError, ValueError):
    """A constructor argument has the wrong value (unknown name, bad structure)."""


class KerasLightningTypeError(KerasLightningError, TypeError):
    """An argument has the wrong type (was ``ArgumentTypeError``, a name that read like
    ``argparse.ArgumentTypeError``; the old name still works, with a deprecation warning).
    """


class BatchError(KerasLightningError, ValueError):
    """A batch from the dataloader does not have a structure the model can use."""


class ShapeMismatchError(KerasLightningError, ValueError):
    """The targets ``y`` cannot be matched with the model output."""


def did_you_mean(name: str, known: list[str] | tuple[str, ...]) -> str:
    """`` Did you mean 'a', 'b'?`` for the known names closest to ``name`` (or ``""``).

    Example:
        >>> did_you_mean("acuracy", ["accuracy", "mae", "mse"])
        " Did you mean 'accuracy'?"
        >>> did_you_mean("zzz", ["accuracy"])
        ''

    """
    close = difflib.get_close_matches(name.lower(), list(known), n=3)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def class_given(argument: str, cls: type, example: str) -> KerasLightningTypeError:
    """The error for a class passed where an instance is expected (``loss=torch.nn.MSELoss``).

    Example:
        >>> import torch
        >>> print(class_given("loss", torch.nn.MSELoss, "torch.nn.MSELoss()"))  # doctest: +ELLIPSIS
        `loss=MSELoss` is a class, but an object is expected: pass loss=torch.nn.MSELoss() ...

    """
    return KerasLightningTypeError(
        f"`{argument}={cls.__name__}` is a class, but an object is expected: pass "
        f"{argument}={example} (with the arguments you want). Received: the class "
        f"{cls.__module__}.{cls.__qualname__}."
    )


class CheckpointError(KerasLightningError, ValueError):
    """A checkpoint does not match the model it is loaded into, or cannot be loaded safely."""
