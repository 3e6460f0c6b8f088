"""Checkpoint files: the atomic writer and the safe reader."""

from __future__ import annotations

from keras_lightning import _private
from keras_lightning.exceptions import CheckpointError

import contextlib
import io
import os
import pickle
import re
import tempfile
import time
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

#: When this process imported the package: partial files older than this are not its writes.
_STARTED = time.time()
#: Tolerance for a network filesystem's clock being ahead of this machine's.
_CLOCK_MARGIN_S = 600.0
#: The names ``tempfile.mkstemp(prefix=".<name>.", suffix=".partial")`` gives.
_PARTIAL_NAME = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.partial")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic on every local filesystem.

    ``KerasLightningModule`` puts it in place of Lightning's default writer when training
    starts (:func:`use_atomic_writes`); pass it as a plugin to any other module.

    Lightning writes a checkpoint to a temporary file in the system temp directory and moves
    it into place. When that directory is on another filesystem than the checkpoints (``/tmp``
    on tmpfs, checkpoints on a disk or a network mount), the move is a copy onto the target
    file, and a process killed during the copy leaves a truncated checkpoint where the
    previous good one was. This writer puts the temporary file next to the target, flushes it
    to disk and renames it (``os.replace``), so the target is always either the previous or
    the new complete checkpoint. A kill during a write leaves a hidden
    ``.<name>.<random>.partial`` file beside it, removed by the next write in that folder
    (:func:`remove_stale_partials`). Remote
    paths (``s3://`` ...) use Lightning's writer unchanged. Reading is safe by default on every
    path, URLs included (:meth:`load_checkpoint`).

    Example:
        >>> import lightning
        >>> import keras_lightning as kl
        >>> trainer = lightning.Trainer(plugins=[kl.AtomicCheckpointIO()], logger=False,
        ...                             enable_progress_bar=False, enable_model_summary=False)

    """

    def load_checkpoint(
        self,
        path: Any,
        map_location: Any = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Read a checkpoint safely: ``weights_only`` unset means True, for URLs too.

        Lightning's own reader turns an unset ``weights_only`` into False for ``http(s)``
        paths, so ``trainer.fit(ckpt_path="https://...")`` would unpickle (and run) whatever
        the server sends. Here it is refused unless the caller opts in:
        ``trainer.fit(..., ckpt_path=url, weights_only=False)`` for a source they trust.

        Raises:
            FileNotFoundError: Nothing at ``path``.
            CheckpointError: Unsafe content (with the opt-in named), or an unreadable file.

        """
        from lightning.fabric.utilities.cloud_io import get_filesystem

        if not get_filesystem(path).exists(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return dict(
            read_checkpoint(
                path,
                map_location,
                weights_only,
                "weights_only=False to trainer.fit / validate / test / predict "
                "(e.g. trainer.fit(module, ckpt_path=path, weights_only=False))",
            )
        )

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` to ``path`` through a same-directory temporary file.

        A checkpoint whose weights hold NaN or infinity is written with a warning that says
        so (and whether it replaces an existing file): it is never swapped in silently.
        """
        from lightning.fabric.utilities.cloud_io import get_filesystem

        _warn_if_not_finite(checkpoint, path)
        if storage_options is not None or not _is_local(get_filesystem(path)):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        descriptor, temp = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=".partial", dir=target.parent
        )
        try:
            # mkstemp makes the file owner-only; give it the mode open() would (Lightning's).
            os.chmod(temp, 0o666 & ~_umask())
            with open(descriptor, "wb") as file:
                file.write(buffer.getbuffer())
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        _fsync_directory(target.parent)
        remove_stale_partials(target)


def remove_stale_partials(target: Path) -> list[Path]:
    """Remove what killed writes left in ``target``'s folder; return what was removed.

    A ``.<name>.<random>.partial`` file is stale when it is of ``target`` itself (this process
    just wrote ``target`` completely), or when it was last written before this process started
    (with ten minutes' margin for a network filesystem's clock; no write of this process made
    it, and a write still running elsewhere keeps its file fresh). Partial files of other
    names written since then are left alone: another process may be writing them right now.
    """
    removed = []
    own = f".{target.name}."
    for stale in target.parent.glob(".*.partial"):
        if not _PARTIAL_NAME.fullmatch(stale.name):
            continue  # not a name this writer gives
        try:
            old = stale.stat().st_mtime < _STARTED - _CLOCK_MARGIN_S
        except OSError:
            continue
        if stale.name.startswith(own) or old:
            with contextlib.suppress(OSError):
                stale.unlink()
                removed.append(stale)
    return removed


def _warn_if_not_finite(checkpoint: Mapping[str, Any], path: Any) -> None:
    state = checkpoint.get("state_dict") or {}
    bad = [
        key
        for key, value in state.items()
        if isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and not bool(torch.isfinite(value).all())
    ]
    if not bad:
        return
    replaces = " It replaces the checkpoint that was there." if os.path.exists(str(path)) else ""
    warnings.warn(
        f"Writing checkpoint {str(path)!r} whose weights are not finite (NaN or inf in "
        f"{len(bad)} tensors, e.g. {bad[0]}).{replaces} Stop training on a non-finite loss "
        "with kl.TerminateOnNaN(), and keep earlier checkpoints (ModelCheckpoint(save_top_k=-1) "
        "or a monitor) to resume from a good one.",
        RuntimeWarning,
        stacklevel=2,
    )


def use_atomic_writes(trainer: Any) -> None:
    """Give ``trainer`` an :class:`AtomicCheckpointIO` where it would use Lightning's default.

    Only when no checkpoint writer was chosen (``Trainer(plugins=[...])`` or the strategy's
    ``checkpoint_io``) and the strategy's default is Lightning's ``TorchCheckpointIO``: a
    writer the user passed, including Lightning's own ``TorchCheckpointIO()``, and a
    strategy's own default (``XLACheckpointIO``) are kept. Called from
    the module's set-up (``keras_lightning.lifecycle``), before any checkpoint is written or read.
    """
    strategy = getattr(trainer, "strategy", None)
    if strategy is None or _private.chosen_checkpoint_io(strategy) is not None:
        return
    # A strategy's own default (XLA's XLACheckpointIO) is kept: only Lightning's plain one.
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: set and restore (briefly process-wide)
    os.umask(mask)
    return mask


def _is_local(fs: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where directories cannot be opened."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def read_checkpoint(
    path: Any, map_location: Any, weights_only: bool | None, opt_in: str
) -> Any:
    """``torch.load`` through Lightning's reader (paths, URLs, fsspec), errors made clear.

    Args:
        path: A local path, a URL or an fsspec path.
        map_location: As in ``torch.load``.
        weights_only: torch's safe unpickling; None means True here, for URLs too (Lightning's
            own reader turns None into False for ``http`` paths).
        opt_in: The call that turns safe loading off, named in the error.

    Raises:
        CheckpointError: The file holds objects safe loading refuses, or is not a complete
            file ``torch.save`` wrote (truncated, a text file).

    """
    safe = weights_only
    if safe is None and os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0") in ("0", ""):
        safe = True  # torch's own opt-out (that environment variable) is respected
    try:
        return _private.load_checkpoint_file(path, map_location, safe)
    except pickle.UnpicklingError as error:
        if _is_local_non_torch_file(path):  # a text file's bytes read as pickle opcodes
            raise _unreadable(path, error) from error
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in lines if "WeightsUnpickler" in line), str(error))
        raise CheckpointError(
            f"{str(path)!r} holds Python objects that safe loading (weights_only=True) "
            f"refuses: loading them could run code. If you trust the file, pass {opt_in}. "
            f"torch said: {reason}"
        ) from error
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except (EOFError, OSError, RuntimeError, KeyError, ValueError) as error:
        if not _looks_unreadable(error):  # out of memory, a bad map_location, ...: as they are
            raise
        raise _unreadable(path, error) from error


#: What torch says about a file it cannot parse (truncated archive, foreign bytes).
_UNREADABLE_SIGNS = ("pytorchstreamreader", "central directory", "zip", "invalid load key",
                     "unpickling", "ran out of input", "invalid header", "magic number")


def _looks_unreadable(error: BaseException) -> bool:
    if isinstance(error, EOFError | KeyError):
        return True
    if isinstance(error, OSError) and error.errno == 22:  # EINVAL: seeking past a cut file
        return True
    text = str(error).lower()
    return any(sign in text for sign in _UNREADABLE_SIGNS)


def _unreadable(path: Any, error: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{str(path)!r} is not a readable checkpoint: it is truncated (a copy or write cut "
        "short) or not a file torch.save wrote. Use a complete .ckpt written by "
        "ModelCheckpoint or trainer.save_checkpoint(). torch said: "
        f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
    )


def _is_local_non_torch_file(path: Any) -> bool:
    """A local file that is not a zip archive: not what ``torch.save`` has written since 1.6."""
    if not isinstance(path, str | Path) or "://" in str(path):
        return False
    return Path(path).is_file() and not zipfile.is_zipfile(path)


def load_checkpoint_file(
    path: Any, map_location: Any = None, weights_only: bool | None = True
) -> dict[str, Any]:
    """Read a Lightning checkpoint; with ``weights_only=True`` no pickled code runs.

    Raises:
        CheckpointError: The file holds objects that ``weights_only`` loading refuses, is not
            readable, or is not a Lightning checkpoint.

    """
    checkpoint = read_checkpoint(
        path, map_location or "cpu", weights_only, "weights_only=False"
    )
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{str(path)!r} is not a Lightning checkpoint (no 'state_dict'). Expected a .ckpt "
            "file written by ModelCheckpoint or trainer.save_checkpoint()."
        )
    return checkpoint
