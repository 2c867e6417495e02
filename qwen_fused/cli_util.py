"""Helpers shared by the command-line tools (train, edit, check, convert and the benchmark runner)."""
from __future__ import annotations

import argparse
import contextlib
import re


class ArgumentParser(argparse.ArgumentParser):
    """The CLIs' parser (its subcommands' parsers are of this class too). Each flag has one spelling, with
    underscores as the seed's and diffusers' scripts write them (`--learning_rate`; argparse's own `--no-compile`
    keeps its dash), and the other spelling is accepted for it (`--learning-rate`, `--no_compile`): argv is
    rewritten before parsing, since aliases registered with argparse would make every abbreviation ambiguous.
    Negative numbers in scientific notation are values (`--learning_rate -1e-4` then gets the tool's own range
    message; argparse would take it for an option and print its usage)."""

    _NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = self._NEGATIVE_NUMBER  # argparse's own matcher knows no exponents

    def _spelling(self, arg):
        name, eq, value = arg.partition("=")
        if not name.startswith("--") or name in self._option_string_actions:
            return arg
        for other in ("--" + name[2:].replace("-", "_"), "--" + name[2:].replace("_", "-")):
            if any(o.startswith(other) for o in self._option_string_actions):  # exact, or an abbreviation
                return other + eq + value
        return arg

    def parse_known_args(self, args=None, namespace=None):
        import sys

        args = list(sys.argv[1:] if args is None else args)
        end = args.index("--") if "--" in args else len(args)
        return super().parse_known_args([self._spelling(a) for a in args[:end]] + args[end:], namespace)


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
