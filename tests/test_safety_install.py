"""Issue 21, point 6: `pip install -e ".[test]"` (the README's set-up) never replaces a torch the user installed
first. A CUDA torch pins the triton it was built with (torch 2.6: triton==3.2.0); any version asked of triton (or a
torch other than a floor) lets pip satisfy both only by installing another torch. Checked on setup.py's own
requirements (pip, run in a throwaway venv with a CUDA torch 2.6 installed: before, `triton>=3.3` made it
install torch 2.14.1; now it installs no torch)."""
import runpy
from pathlib import Path

import setuptools
from packaging.requirements import Requirement

SETUP = Path(__file__).resolve().parent.parent / "setup.py"


def setup_kwargs(monkeypatch):
    seen = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: seen.update(kw))
    runpy.run_path(str(SETUP))
    return seen


def test_no_extra_constrains_torch_or_triton(monkeypatch):
    kw = setup_kwargs(monkeypatch)
    groups = {"install_requires": kw["install_requires"], **{f"[{k}]": v for k, v in kw["extras_require"].items()}}
    for group, reqs in groups.items():
        for req in map(Requirement, reqs):
            if req.name == "triton":
                assert not req.specifier, f"{group}: {req} (a CUDA torch pins its own triton)"
            if req.name == "torch":
                assert group == "install_requires" and all(s.operator == ">=" for s in req.specifier), \
                    f"{group}: {req} (only a floor: an installed torch above it stays)"


def test_plain_install_pins_nothing(monkeypatch):
    """A user's own diffusers, peft, transformers, ... stay on a plain install: floors only; exact versions only in
    the test extra, for the suite that compares against them."""
    for req in map(Requirement, setup_kwargs(monkeypatch)["install_requires"]):
        assert all(s.operator == ">=" for s in req.specifier), req


def test_every_package_folder_is_installed(monkeypatch):
    """A plain (not editable) install gets every subpackage: each folder with an `__init__.py` under the three
    package roots is in setup.py's `packages` (qwen_fused.families once was not, and only `pip install -e` worked)."""
    installed = set(setup_kwargs(monkeypatch)["packages"])
    roots = {"qwen_fused": "qwen_fused", "kernels": "qwen_fused.kernels", "bench": "qwen_fused.bench"}
    wanted = {".".join((name, *init.parent.relative_to(SETUP.parent / folder).parts))
              for folder, name in roots.items() for init in (SETUP.parent / folder).rglob("__init__.py")}
    assert "qwen_fused.families" in wanted and wanted <= installed, sorted(wanted - installed)
