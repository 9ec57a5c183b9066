"""The Python API: what ``import pyro_cvae`` offers, and the README's session, run as written."""

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

import pyro_cvae
from pyro_cvae import data, evaluate, model, runs, sample

from .helpers import train_tiny

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_export_is_the_library_object_and_documented():
    assert {
        "load_run",
        "completions",
        "evaluate_run",
        "ncll_per_image",
        "VARIANTS",
        "get_variant",
        "evaluation_masks",
        "load_split",
    } <= set(pyro_cvae.__all__)
    assert pyro_cvae.load_run is runs.load_run and pyro_cvae.completions is sample.completions
    assert (
        pyro_cvae.ncll_per_image is evaluate.ncll_per_image and pyro_cvae.VARIANTS is model.VARIANTS
    )
    assert pyro_cvae.evaluation_masks is data.evaluation_masks
    for name in pyro_cvae.__all__:
        thing = getattr(pyro_cvae, name)
        assert not callable(thing) or (thing.__doc__ or "").strip(), f"{name} has no docstring"
    assert set(pyro_cvae.__all__) <= set(dir(pyro_cvae))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        pyro_cvae.nothing  # noqa: B018


def _readme_session() -> str:
    """The python block of the README's "In Python" section."""
    section = README.read_text().split("## In Python", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return block


def test_the_readme_session_runs(tmp_path, monkeypatch, mnist_dir):
    train_tiny(tmp_path / "runs" / "no-baseline", "no-baseline")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYRO_CVAE_DATA", str(mnist_dir))
    namespace, printed = {}, io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(_readme_session(), str(README), "exec"), namespace)
    assert namespace["images"].shape == (10, 784) and namespace["completed"].shape == (5, 10, 784)
    hidden = namespace["hidden"]
    assert torch.equal(
        namespace["completed"][:, ~hidden], namespace["images"][~hidden].expand(5, -1)
    )
    ncll = namespace["ncll"]
    assert ncll.shape == (10,) and torch.isfinite(ncll).all() and (ncll > 0).all()
    assert re.fullmatch(
        r"no-baseline after 1 epochs: NCLL \d+\.\d\d nats per digit\n", printed.getvalue()
    )
