"""Keras' update, by the shortest path that is bit-identical to ``optimizer.apply``.

``apply`` redoes set-up work on every call (name scopes, list copies, variable and
empty-gradient filters, per-op dispatch of the learning rate and step count). Once the
optimizer is built, :func:`update_path_for` picks one of three exact paths:

- ``"adam"`` / ``"sgd"``: :class:`DirectUpdate`, Keras' torch ``Adam`` / ``AdamW`` / ``SGD``
  update op for op with the slots looked up once. Only where the optimizer's class overrides
  none of the methods involved and Keras' update body is the very source this class was
  written from (``_private.direct_update_kind`` compares a digest of it), so a Keras release
  that changes the body falls back to ``"short"`` instead of silently diverging.
- ``"short"``: ``_backend_apply_gradients`` and ``iterations += 1`` (clipping, EMA,
  accumulation and other optimizers).
- ``"apply"``: ``optimizer.apply`` itself (``LossScaleOptimizer``, constrained variables,
  optimizers with their own ``apply``).

The tests check each path bit for bit against ``apply``.
"""

from __future__ import annotations

from keras_lightning import _private
from keras_lightning._private import parameter_of

from collections.abc import Sequence
from typing import Any

import keras
import torch

__all__ = ["DirectUpdate", "update_path_for"]


def update_path_for(optimizer: Any, variables: Sequence[Any]) -> str:
    """The :attr:`KerasOptimizer.update_path` that does exactly what ``apply`` does."""
    if not _private.uses_base_apply(optimizer):
        return "apply"  # e.g. LossScaleOptimizer: its own apply
    if not _private.optimizer_knows(optimizer, variables) or any(
        getattr(v, "constraint", None) is not None or getattr(v, "overwrite_with_gradient", False)
        for v in variables
    ):
        return "apply"
    return DirectUpdate.kind_for(optimizer) or "short"


class DirectUpdate:
    """Keras' torch ``Adam`` / ``SGD`` update, op for op, without Keras' per-op dispatch.

    Keras' torch backend already updates with ``torch._foreach`` ops
    (``keras/src/backend/torch/optimizers/torch_adam.py`` and ``torch_sgd.py``); around them,
    each step converts and casts the learning rate, step count and betas through Keras ops and
    looks up every slot by variable: on the guides' MLP that dispatch cost more than the
    update itself. This runs the same torch ops in the same order on the same dtypes (so the
    result is bit-identical), with the slots looked up once. Used only when
    ``_backend_apply_gradients`` would do nothing else: no clipping, no EMA, no gradient
    accumulation, and none of the methods involved overridden by a subclass.
    """

    KINDS = ("adam", "sgd")

    @staticmethod
    def kind_for(optimizer: Any) -> str | None:
        """``"adam"`` / ``"sgd"`` where this class reproduces the update exactly, else None."""
        if not DirectUpdate.plain(optimizer):
            return None
        return _private.direct_update_kind(optimizer)

    @staticmethod
    def plain(optimizer: Any) -> bool:
        """No clipping, EMA or gradient accumulation: the update is the optimizer's alone."""
        return not (
            optimizer.gradient_accumulation_steps
            or optimizer.use_ema
            or optimizer.clipnorm
            or optimizer.clipvalue
            or optimizer.global_clipnorm
        )

    def applies(self) -> bool:
        """Checked on every step: a callback may set ``clipnorm`` (...) mid-training."""
        return self.plain(self.optimizer)

    def __init__(self, optimizer: Any, variables: Sequence[Any], kind: str) -> None:
        self.optimizer = optimizer
        self.kind = kind
        self.count = len(variables)
        self._constants: dict[Any, torch.Tensor] = {}
        if kind == "adam":
            self._all_slots = self._adam_slots(variables)
        else:
            self._all_slots = self._sgd_slots(variables)

    def _adam_slots(self, variables: Sequence[Any]) -> tuple[list[Any], ...]:
        return _private.adam_slots(self.optimizer, variables)

    def _sgd_slots(self, variables: Sequence[Any]) -> tuple[list[Any], ...]:
        return (_private.sgd_slots(self.optimizer, variables),)

    def _constant(self, value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        # keras.ops.cast(python_float, dtype): a tensor made once, not on every step.
        key = (value, dtype, device)
        tensor = self._constants.get(key)
        if tensor is None:
            tensor = self._constants[key] = torch.as_tensor(value, dtype=dtype, device=device)
        return tensor

    def __call__(self, grads: list[torch.Tensor], variables: list[Any]) -> None:
        """Apply one update to ``variables`` (those that got a gradient this step)."""
        optimizer = self.optimizer
        if len(variables) == self.count:
            slots = self._all_slots
        elif self.kind == "adam":  # some variables got no gradient this step
            slots = self._adam_slots(variables)
        else:
            slots = self._sgd_slots(variables)
        if optimizer.weight_decay is not None:
            _private.apply_weight_decay(optimizer, variables)
        values = [parameter_of(v) for v in variables]
        if self.kind == "adam":
            self._adam(grads, values, *slots)
        else:
            self._sgd(grads, values, *slots)
        _private.iterations_parameter(optimizer).add_(1)

    def _learning_rate(self, dtype: torch.dtype) -> torch.Tensor:
        # keras.ops.cast(optimizer.learning_rate, dtype)
        lr = _private.current_learning_rate(self.optimizer)
        if isinstance(lr, keras.Variable):
            lr = parameter_of(lr)
        if isinstance(lr, torch.Tensor):
            return lr if lr.dtype == dtype else lr.to(dtype)
        return keras.ops.cast(lr, dtype)

    def _adam(
        self,
        grads: list[torch.Tensor],
        values: list[torch.Tensor],
        momentums: list[Any],
        velocities: list[Any],
        velocity_hats: list[Any],
    ) -> None:
        # torch_adam.Adam._parallel_update_step, with Keras ops replaced by the torch ops they run.
        optimizer = self.optimizer
        dtype, device = values[0].dtype, values[0].device
        lr = self._learning_rate(dtype)
        local_step = (_private.iterations_parameter(optimizer) + 1).to(dtype)
        beta_1, beta_2 = optimizer.beta_1, optimizer.beta_2
        beta_1_power = torch.pow(self._constant(beta_1, dtype, device), local_step)
        beta_2_power = torch.pow(self._constant(beta_2, dtype, device), local_step)
        alpha = lr * torch.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        m_list = [parameter_of(m) for m in momentums]
        v_list = [parameter_of(v) for v in velocities]
        torch._foreach_mul_(m_list, beta_1)
        torch._foreach_add_(m_list, grads, alpha=1 - beta_1)
        torch._foreach_mul_(v_list, beta_2)
        torch._foreach_add_(v_list, torch._foreach_mul(grads, grads), alpha=1 - beta_2)
        if optimizer.amsgrad:
            v_hat_list = [parameter_of(v) for v in velocity_hats]
            torch._foreach_maximum_(v_hat_list, v_list)
            v_list = v_hat_list
        torch._foreach_add_(
            values,
            torch._foreach_div(
                torch._foreach_mul(m_list, alpha),
                torch._foreach_add(torch._foreach_sqrt(v_list), optimizer.epsilon),
            ),
            alpha=-1,
        )

    def _sgd(
        self, grads: list[torch.Tensor], values: list[torch.Tensor], momentums: list[Any]
    ) -> None:
        # torch_sgd.SGD._parallel_update_step; Keras passes the learning-rate variable itself.
        optimizer = self.optimizer
        learning_rate = optimizer.learning_rate
        if optimizer.momentum == 0:
            torch._foreach_add_(values, grads, alpha=-learning_rate)
            return
        bufs = [parameter_of(m) for m in momentums]
        torch._foreach_mul_(bufs, optimizer.momentum)
        torch._foreach_add_(bufs, grads, alpha=-learning_rate)
        if optimizer.nesterov:
            torch._foreach_add_(values, grads, alpha=-learning_rate)
            torch._foreach_add_(values, bufs, alpha=optimizer.momentum)
        else:
            torch._foreach_add_(values, bufs)
