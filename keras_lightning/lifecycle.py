"""Library behaviour that runs whatever a subclass overrides, with or without ``super()``.

Lightning's hooks are meant for users: a subclass overrides ``setup`` or
``on_validation_epoch_end`` and often does not call ``super()``. The work this package does in
those hooks (device placement, atomic checkpoint writes, the ``ddp_notebook`` fork check,
BatchNorm statistics kept equal across ranks, epoch metrics, checkpoint contents) must not be
lost then. So the module does that work in ``_library_<hook>`` methods, and every definition
of a hook listed in :data:`LIBRARY_HOOKS` (the module's own and any subclass's) is wrapped
by :func:`guard_hooks`: the wrapper runs the library part once per call, then the
definition's body. A subclass body that calls ``super()`` reaches the next wrapper, which sees
the library part already ran for this call and goes straight to the body.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

__all__ = ["LIBRARY_HOOKS", "RUNNING_HOOKS", "guard_hooks"]

#: The Lightning hooks in which the module does work of its own, and when: ``"before"`` the
#: body of the hook's definition. The module implements each as ``_library_<hook>``.
LIBRARY_HOOKS = (
    "configure_model",
    "setup",
    "configure_callbacks",
    "configure_optimizers",
    "on_fit_start",
    "on_train_start",
    "on_train_end",
    "on_train_batch_start",
    "on_before_optimizer_step",
    "on_train_epoch_start",
    "on_validation_epoch_start",
    "on_test_epoch_start",
    "on_train_epoch_end",
    "on_validation_epoch_end",
    "on_test_epoch_end",
    "on_save_checkpoint",
    "on_load_checkpoint",
)

_GUARDED = "__keras_lightning_guarded__"
#: Instance attribute holding the hooks whose library part runs now (dropped when pickled).
RUNNING_HOOKS = "_keras_lightning_running_hooks"


def _guarded(name: str, body: Callable[..., Any]) -> Callable[..., Any]:
    library = f"_library_{name}"

    @functools.wraps(body)
    def hook(self: Any, *args: Any, **kwargs: Any) -> Any:
        running = self.__dict__.get(RUNNING_HOOKS)
        if running is None:
            running = self.__dict__[RUNNING_HOOKS] = set()
        if name in running:  # a super() call from an override: the library part ran
            return body(self, *args, **kwargs)
        running.add(name)
        try:
            getattr(self, library)(*args, **kwargs)
            return body(self, *args, **kwargs)
        finally:
            running.discard(name)

    setattr(hook, _GUARDED, True)
    return hook


def guard_hooks(cls: type) -> None:
    """Wrap every hook of :data:`LIBRARY_HOOKS` that ``cls`` itself defines (see module doc)."""
    for name in LIBRARY_HOOKS:
        body = cls.__dict__.get(name)
        if body is None or not callable(body) or getattr(body, _GUARDED, False):
            continue
        setattr(cls, name, _guarded(name, body))
