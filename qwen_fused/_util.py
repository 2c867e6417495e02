"""Small helpers shared by the CLI tools and the benchmark runner."""
from __future__ import annotations

import contextlib


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
