"""pyro-cvae: the conditional VAE of Sohn, Lee & Yan (2015) in Pyro.

What a notebook needs, in one place::

    import pyro_cvae

    cvae, config, _ = pyro_cvae.load_run("runs/joint-scratch")
    images, labels = pyro_cvae.load_split("test", limit=10)
    hidden = pyro_cvae.evaluation_masks(len(images), config.mask, config.inputs)
    completed = pyro_cvae.completions(cvae, images, hidden, num_samples=5)   # (5, 10, 784)
    ncll, ess = pyro_cvae.ncll_per_image(cvae, images, hidden, samples=100)  # (10,), (10,)

Each name is imported from its module on first use, so that ``pyro-cvae --help`` stays quick
(training is ``pyro_cvae.train.train``: the name ``train`` here is that module).
"""

import importlib

__version__ = "0.1.0"

_HOME = {  # exported name -> the module that defines it
    "load_split": "data",
    "evaluation_masks": "data",
    "hidden_masks": "data",
    "fixed_hidden": "data",
    "visible_input": "data",
    "CVAE": "model",
    "Variant": "model",
    "VARIANTS": "model",
    "get_variant": "model",
    "TrainConfig": "config",
    "load_run": "runs",
    "trained_runs": "runs",
    "evaluate_run": "evaluate",
    "evaluate_runs": "evaluate",
    "ncll_per_image": "evaluate",
    "tune_proposal": "proposals",
    "Refine": "config",
    "completions": "sample",
    "sample_grid": "sample",
    "compare_runs": "sample",
}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
