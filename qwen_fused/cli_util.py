"""Helpers shared by the command-line tools (train, edit, check, convert and the benchmark runner)."""
from __future__ import annotations

import argparse
import contextlib


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """`--help` of the CLI tools: descriptions keep their hand-made layout, and each option shows its default.
    None and [] mean "not given" (the help says what happens then) and a switch's default is its being off, so
    those are not shown."""

    def _get_help_string(self, action):
        if action.nargs == 0 or action.default is None or action.default == []:
            return action.help
        return super()._get_help_string(action)


def scratch_folder(prefix: str) -> str:
    """A new temp folder that is removed when this process exits: for what a `--demo` builds only to feed its
    own run (the tiny model, ~36 MB, and its data), never for the output the user keeps."""
    import atexit
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def resolve_device(name=None):
    """The torch device for a `--device` value (None: cuda if available, else cpu). A device this torch cannot
    use is a ValueError that names it: the CLIs print it as an `error:` line instead of a traceback from deep
    inside a run."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name}: not a device name ({e})") from None
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.xpu, ...: each has is_available()
    if device.type != "cpu" and hasattr(backend, "is_available"):
        if not backend.is_available():
            build = (f" (torch {torch.__version__} is built without CUDA)"
                     if device.type == "cuda" and torch.version.cuda is None else "")
            raise ValueError(f"--device {name}: no {device.type} device available{build}; use --device cpu")
        if device.index is not None and device.index >= backend.device_count():
            raise ValueError(f"--device {name}: there are only {backend.device_count()} {device.type} devices")
    return device


@contextlib.contextmanager
def quiet_diffusers():
    """diffusers warns on every `ModelMixin.to(dtype)` of a model built in code; nothing to act on there."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
