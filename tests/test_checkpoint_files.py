"""Checkpoint files: safe loading on every path into the process, clear errors on bad files.

A real HTTP server on 127.0.0.1 serves a crafted checkpoint whose unpickling creates a
directory (a harmless stand-in for code execution); nothing may create it unless the caller
opts in with ``weights_only=False``.
"""

from __future__ import annotations

import keras_lightning as kl

import functools
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import loader, make_trainer, mlp
from lightning.pytorch.plugins.io import TorchCheckpointIO


class _Payload:
    """Unpickling this calls ``os.mkdir(marker)``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> Any:
        return (os.mkdir, (self.marker,))


def _module() -> kl.KerasLightningModule:
    return kl.KerasLightningModule(mlp(hidden=4), optimizer="sgd", loss="mse")


def _data() -> torch.utils.data.DataLoader:
    return loader(torch.randn(8, 64), torch.randn(8, 10), batch_size=4)


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """A crafted checkpoint, served over HTTP from 127.0.0.1; yields (url, marker)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # torch.hub's download cache
    trainer = make_trainer(max_epochs=1)
    trainer.fit(_module(), _data())
    good = tmp_path / "good.ckpt"
    trainer.save_checkpoint(good)
    checkpoint = torch.load(good, weights_only=True)
    marker = tmp_path / "payload_ran"
    checkpoint["extra"] = _Payload(marker)
    root = tmp_path / "www"
    root.mkdir()
    torch.save(checkpoint, root / "crafted.ckpt")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/crafted.ckpt", marker
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.mark.parametrize("call", ["fit", "validate", "test", "predict"])
def test_a_checkpoint_url_is_loaded_safely_by_default(served, call):
    url, marker = served
    trainer = make_trainer(max_epochs=2)
    with pytest.raises(kl.CheckpointError, match=r"weights_only=False to trainer\.fit"):
        getattr(trainer, call)(_module(), _data(), ckpt_path=url)
    assert not marker.exists()


def test_the_opt_in_loads_a_trusted_url_and_plain_lightning_would_have_run_it(served):
    url, marker = served
    # Lightning's own writer, chosen explicitly: the crafted file runs its payload, which
    # shows the file is really unsafe (this is what the library's default prevents).
    trainer = make_trainer(max_epochs=2, plugins=[TorchCheckpointIO()])
    trainer.validate(_module(), _data(), ckpt_path=url)
    assert marker.exists()
    marker.rmdir()
    # The library's default writer, with the caller's explicit opt-in for a trusted source.
    trainer = make_trainer(max_epochs=2)
    trainer.validate(_module(), _data(), ckpt_path=url, weights_only=False)
    assert marker.exists()


def test_load_from_checkpoint_refuses_the_url_too(served):
    url, marker = served
    with pytest.raises(kl.CheckpointError, match="refuses: loading them could run code"):
        kl.KerasLightningModule.load_from_checkpoint(url)
    assert not marker.exists()


def _good_checkpoint(tmp_path: Path) -> Path:
    trainer = make_trainer(max_epochs=1)
    trainer.fit(_module(), _data())
    path = tmp_path / "good.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize("kind", ["truncated", "text"])
def test_an_unreadable_checkpoint_is_a_named_error_with_its_path(tmp_path, kind):
    good = _good_checkpoint(tmp_path)
    bad = tmp_path / f"{kind}.ckpt"
    if kind == "truncated":
        data = good.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    else:
        bad.write_text("101 not a checkpoint\n")
    with pytest.raises(kl.CheckpointError, match=rf"{kind}\.ckpt' is not a readable checkpoint"):
        kl.KerasLightningModule.load_from_checkpoint(bad)
    with pytest.raises(kl.CheckpointError, match="truncated .* or not a file torch.save wrote"):
        make_trainer(max_epochs=2).fit(_module(), _data(), ckpt_path=bad)
    # the good file next to it still resumes
    trainer = make_trainer(max_epochs=2)
    trainer.fit(_module(), _data(), ckpt_path=good)
    assert trainer.current_epoch == 2


def test_a_missing_checkpoint_is_still_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="Checkpoint file not found"):
        make_trainer(max_epochs=1).fit(_module(), _data(), ckpt_path=tmp_path / "none.ckpt")


def test_the_next_save_in_a_folder_removes_what_killed_writes_left(tmp_path):
    # What a write killed in an earlier process leaves (the name AtomicCheckpointIO's mkstemp
    # gives), dated before this process started; and one a live writer elsewhere might own.
    old = tmp_path / ".epoch=3-step=40.ckpt.k2j4h1x8.partial"
    old.write_bytes(b"half a checkpoint")
    an_hour_ago = files_module()._STARTED - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    fresh = tmp_path / ".epoch=4-step=50.ckpt.p9q8r7s6.partial"
    fresh.write_bytes(b"being written by another process")
    unrelated = tmp_path / "notes.partial"  # not hidden: not one of ours
    unrelated.write_text("keep")
    trainer = make_trainer(max_epochs=1)
    trainer.fit(_module(), _data())
    trainer.save_checkpoint(tmp_path / "last.ckpt")  # another name, same folder
    assert not old.exists()
    assert fresh.exists() and unrelated.exists()
    assert (tmp_path / "last.ckpt").exists()


def files_module():
    import keras_lightning.checkpoint.files as files

    return files
