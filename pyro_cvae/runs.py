"""A run directory, and the only module that knows its files.

    config.json                   the run's configuration, a readable copy of the checkpoint's
    checkpoint.pt                 model, optimiser and RNG state, epoch, batch, step, config and
                                  the per-epoch metrics: the truth about the run
    metrics.jsonl                 one line per epoch, a readable copy of the checkpoint's
    eval-<split>-S<S>.json        an evaluation on the whole split with seed 0 (plot and tables
                                  read these); eval-<split>-S<S>-n<N>-seed<K>.json otherwise; with
                                  the guide as proposal (files of earlier versions are all that),
                                  else the proposal named last: eval-<split>-S<S>-refined.json
    proposal-tuned.pt             an evaluation proposal fitted to the checkpoint's model
                                  (``proposals``), void once the run trains further
    samples-<split>.png           a sample grid
    reproduce.log                 what scripts/reproduce.py did with the run
    train.lock                    the id of the process training the run, while it does (lock.py)

Every file is written atomically. A checkpoint is written first and the copies after it, so a
kill between the two leaves the checkpoint right and the copies are redone from it. Results
record the checkpoint they were computed from and count only while it is the one on disk.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .atomic import atomic_write, atomic_write_text, read_regular_bytes, read_regular_text
from .config import PROPOSALS, OptionError, TrainConfig
from .data import Mask
from .lock import LOCK, LOCK_MARK, LockError, hold  # noqa: F401 (LOCK_MARK: for callers)
from .model import CVAE, VARIANTS, get_variant

CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SWEEP_LOG = "reproduce.log"
TUNED = "proposal-tuned.pt"
# what a checkpoint must hold, and of which type
_CHECKPOINT_KEYS = {
    "model": dict,
    "optimizer": dict,
    "epoch": int,
    "batch": int,
    "step": int,
    "rng": torch.Tensor,
    "config": dict,
}


class RunError(RuntimeError):
    """A run directory is missing, unfinished, inconsistent, busy or diverged; the message says what to do."""


def run_name(
    variant: str, mask: Mask | str = Mask.random, inputs: int | None = None, seed: int = 0
) -> str:
    """``joint-scratch``, ``cvae-fixed2``; a training seed other than 0 is named: ``joint-scratch-seed1``."""
    name = variant if Mask(mask) is Mask.random else f"{variant}-fixed{inputs or 1}"
    return name if seed == 0 else f"{name}-seed{seed}"


def default_run_dir(runs_dir: str | Path, config: TrainConfig) -> Path:
    return Path(runs_dir) / run_name(config.variant, config.mask, config.inputs, config.seed)


def comparison_path(runs_dir: str | Path, split: str, mask: Mask, inputs: int | None) -> Path:
    """The picture comparing the runs of one masking protocol, in the runs directory."""
    return (
        Path(runs_dir)
        / f"samples-{split}{'' if Mask(mask) is Mask.random else f'-fixed{inputs}'}.png"
    )


def baseline_run_dir(runs_dir: str | Path, config: TrainConfig) -> Path:
    """Where the pretrained baseline of a run's variant (and of its masks) lives."""
    return default_run_dir(runs_dir, config.baseline())


def select_run(
    run_dir: Path | None,
    runs_dir: Path | None,
    variant: str | None = None,
    mask: Mask | None = None,
    inputs: int | None = None,
) -> Path | None:
    """The run a command names: ``run_dir``, or ``runs_dir/<variant>[-fixed<K>]``; None when
    none is named. Beside a ``run_dir``, a variant, mask or inputs must be what that run holds:
    they are never ignored."""
    if run_dir is None:
        if variant is None:
            if mask is not None or inputs is not None:
                raise OptionError(
                    "--mask and --inputs choose among the runs of a --variant; add --variant NAME."
                )
            return None
        if inputs is not None and mask is not Mask.fixed:
            raise OptionError(
                f"--inputs {inputs} applies to --mask fixed only; drop it or add --mask fixed."
            )
        return Path(runs_dir or "runs") / run_name(variant, mask or Mask.random, inputs)
    if variant is None and mask is None and inputs is None:
        return run_dir
    config = Run(run_dir).config()
    asked = {
        "--variant": (variant, config.variant),
        "--mask": (mask and Mask(mask).value, config.mask.value),
        "--inputs": (inputs, config.inputs),
    }
    for option, (value, held) in asked.items():
        if value is not None and value != held:
            holds = f"{config.variant} on {config.mask.value} masks" + (
                f", {config.inputs} visible" if config.inputs else ""
            )
            raise OptionError(
                f"{run_dir} holds a run of {holds}, not {option} {value}; drop {option} "
                f"or name the run with --variant/--mask/--inputs and --runs-dir instead of --run-dir."
            )
    return run_dir


@dataclass
class Run:
    """One run directory: what it holds, read and written consistently."""

    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    # ------------------------------------------------------------------ files

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    def evaluation_path(
        self,
        split: str,
        samples: int,
        limit: int | None = None,
        seed: int = 0,
        proposal: str = "guide",
    ) -> Path:
        """S as drawn (``Variant.importance_samples``); ``limit`` None: the whole split; the
        guide's files keep the name they had before proposals were named."""
        name = f"eval-{split}-S{samples}"
        if limit is not None or seed != 0:
            name += f"-n{limit if limit is not None else 'all'}-seed{seed}"
        if proposal != "guide":
            name += f"-{proposal}"
        return self.path / f"{name}.json"

    @property
    def tuned_proposal_path(self) -> Path:
        return self.path / TUNED

    def samples_path(self, split: str) -> Path:
        return self.path / f"samples-{split}.png"

    @property
    def sweep_log_path(self) -> Path:
        return self.path / SWEEP_LOG

    def exists(self) -> bool:
        return self.checkpoint_path.is_file()

    def _foreign_problem(self) -> str | None:
        """Why training must not go into this folder: it holds files, but no run (training
        would mix its files with them, and remove those named like a run's results)."""
        if not self.path.is_dir() or self.exists() or self.config_path.is_file():
            return None
        # a trainer's (maybe killed) and the sweep's log, written before the first checkpoint
        ours = re.compile(rf"^({re.escape(LOCK)}|{re.escape(SWEEP_LOG)}|\..+\.tmp\d+)$")
        theirs = sorted(p.name for p in self.path.iterdir() if not ours.match(p.name))
        if not theirs:
            return None
        shown = ", ".join(theirs[:3]) + (f" and {len(theirs) - 3} more" if len(theirs) > 3 else "")
        return (
            f"{self.path} is not a run but holds files ({shown}); nothing was changed: train into "
            "a new or empty folder (choose another --run-dir or --runs-dir)."
        )

    # ------------------------------------------------------------------ lock

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run for one training process (``lock.hold`` says how); a RunError names the
        process holding it. A folder that is a file, a dangling link, or holds files that are
        not a run's is refused before anything is made or deleted in it."""
        problem = _folder_problem(self.path) or self._foreign_problem()
        if problem:
            raise RunError(problem)
        try:
            with hold(self.path):
                yield
        except LockError as e:
            raise RunError(str(e)) from None

    # ------------------------------------------------------------------ checkpoint and config

    def read_checkpoint(self, device: torch.device | str = "cpu", mmap: bool = False) -> dict:
        """The checkpoint, checked to be one of this package's (``RunError`` naming what is wrong);
        ``mmap``: tensors are mapped, not read (to look at the counters only)."""
        path = self.checkpoint_path
        if not path.is_file():
            raise RunError(
                f"no checkpoint in {self.path}; train it first: pyro-cvae train --run-dir {self.path} --variant NAME."
            )
        checkpoint = load_checkpoint_file(path, device, mmap)
        problem = _checkpoint_problem(checkpoint)
        if problem:
            raise RunError(
                f"{path} is not a checkpoint of this program ({problem}); delete it or train again with --force."
            )
        return checkpoint

    def config(
        self, checkpoint: dict | None = None, log: Callable[[str], None] | None = None
    ) -> TrainConfig:
        """The run's config, from its checkpoint (the truth); ``log`` hears of an edited config.json."""
        checkpoint = checkpoint if checkpoint is not None else self.read_checkpoint(mmap=True)
        config = TrainConfig.from_dict(checkpoint["config"])
        if log is not None and self._config_copy() != checkpoint["config"]:
            log(
                f"note: {self.config_path} does not match the checkpoint; using the checkpoint's config ({config.variant})."
            )
        return config

    def valid_config(
        self, checkpoint: dict, log: Callable[[str], None] | None = None
    ) -> TrainConfig:
        """``config``, or a RunError saying the checkpoint's config is not valid and what to do."""
        try:
            return self.config(checkpoint, log)
        except ValueError as e:
            raise RunError(
                f"{self.checkpoint_path} holds a config that is not valid ({e}); "
                "start the run over with --force."
            ) from None

    def _config_copy(self) -> Any:
        try:
            return json.loads(read_regular_text(self.config_path) or "null")
        except ValueError:
            return None

    def write_checkpoint(self, state: dict) -> None:
        """Save a checkpoint, then its readable copies; results of earlier weights are removed."""
        try:
            atomic_write(self.checkpoint_path, lambda tmp: torch.save(state, tmp))
        except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError
            kept = (
                "the previous checkpoint is kept" if self.exists() else "no checkpoint was written"
            )
            raise RunError(
                f"cannot save {self.checkpoint_path} ({type(e).__name__}: {e}); {kept}. "
                "Free disk space and run the same command to resume."
            ) from None
        self.write_copies(state)
        for stale in [*self.path.glob("eval-*.json"), *self.path.glob("samples-*.png")]:
            stale.unlink(missing_ok=True)

    def write_copies(self, checkpoint: dict) -> None:
        """config.json and metrics.jsonl as the checkpoint has them (redone after a kill between)."""
        if self._config_copy() != checkpoint["config"]:
            atomic_write_text(json.dumps(checkpoint["config"], indent=2) + "\n", self.config_path)
        lines = "".join(json.dumps(record) + "\n" for record in checkpoint.get("metrics", []))
        if "metrics" in checkpoint and _read_text(self.metrics_path) != lines:
            atomic_write_text(lines, self.metrics_path)

    def read_metrics(self) -> list[dict]:
        """The per-epoch records of the run, in epoch order: the checkpoint's, else (a run saved
        before checkpoints held them) metrics.jsonl's, whose torn lines are skipped."""
        try:
            checkpoint = load_checkpoint_file(self.checkpoint_path, mmap=True)
            if _checkpoint_problem(checkpoint) is None and isinstance(
                checkpoint.get("metrics"), list
            ):
                return list(checkpoint["metrics"])
        except RunError:  # not a checkpoint we can read: the copy, then
            pass
        by_epoch = {}
        for line in (_read_text(self.metrics_path) or "").splitlines():
            try:
                record = json.loads(line)
                by_epoch[int(record["epoch"])] = record
            except (ValueError, KeyError, TypeError):
                continue
        return [by_epoch[e] for e in sorted(by_epoch)]

    def is_finished(self) -> bool:
        """Whether the directory holds a run trained for all the epochs of its config."""
        try:
            checkpoint = self.read_checkpoint(mmap=True)
            return checkpoint["epoch"] >= self.config(checkpoint).epochs
        except (RunError, ValueError):
            return False

    def load(
        self, device: torch.device | str = "cpu", log: Callable[[str], None] | None = None
    ) -> tuple[CVAE, TrainConfig, dict]:
        """A trained (or partly trained) run: the model with its weights, its config and checkpoint."""
        if not self.exists() and not self.config_path.is_file():
            raise RunError(
                f"{self.path} is not a run (no {CHECKPOINT}); train one with: "
                f"pyro-cvae train --variant NAME --run-dir {self.path}."
            )
        checkpoint = self.read_checkpoint(device)
        config = self.valid_config(checkpoint, log)
        cvae = CVAE(get_variant(config.variant)).to(device)
        try:
            cvae.load_state_dict(checkpoint["model"])
        except (KeyError, RuntimeError) as e:
            raise RunError(
                f"{self.checkpoint_path} does not fit a {config.variant} model ({type(e).__name__}); "
                "train it again with --force."
            ) from None
        return cvae, config, checkpoint

    # ------------------------------------------------------------------ evaluations

    def write_evaluation(self, record: dict, limit: int | None) -> Path:
        path = self.evaluation_path(
            record["split"], record["samples"], limit, record["seed"], record["proposal"]
        )
        atomic_write_text(json.dumps(record, indent=2) + "\n", path)
        return path

    def current_evaluation(self, *options, **named) -> dict | None:
        """The saved evaluation of ``evaluation_path``'s options (split, S as drawn, limit, seed,
        proposal), if it was computed from the checkpoint on disk."""
        return self._current(self.evaluation_path(*options, **named), self._identity())

    def best_evaluation(self, split: str, proposal: str = "guide") -> dict | None:
        """The current evaluation on ``split`` with ``proposal`` most like the protocol the
        outside figures used (seed 0's masks, the most images, S=100, then the most samples), if
        any: a plot must not set an S=5,000 figure on 1,000 images beside the reference's S=100
        on 10,000."""
        identity = self._identity()
        found = [
            r
            for p in self.path.glob(f"eval-{split}-S*.json")
            if (r := self._current(p, identity)) is not None and r["proposal"] == proposal
        ]
        return max(
            found,
            key=lambda r: (
                r.get("seed") == 0,
                r.get("images", 0),
                r["samples"] == 100,
                r["samples"],
            ),
            default=None,
        )

    def _identity(self) -> dict | None:
        try:
            checkpoint = load_checkpoint_file(self.checkpoint_path, mmap=True)
            return {
                "step": checkpoint["step"],
                "epoch": checkpoint["epoch"],
                "run_id": checkpoint.get("run_id"),
            }
        except Exception:
            return None

    @staticmethod
    def _current(path: Path, identity: dict | None) -> dict | None:
        try:
            record = json.loads(read_regular_text(path) or "null")
        except ValueError:
            return None
        if identity is None or _evaluation_problem(record) is not None:
            return None
        if record.get("proposal") not in PROPOSALS:  # written before proposals were named
            record["proposal_detail"] = record.get("proposal")
            record["proposal"] = "guide"
        record["run_dir"] = str(path.parent)  # its folder, wherever it was copied from
        if "step" in record:
            current = (
                record["step"] == identity["step"] and record.get("run_id") == identity["run_id"]
            )
        else:  # written before results named their checkpoint
            current = record.get("epochs") == identity["epoch"]
        return record if current else None

    # ------------------------------------------------------------------ the tuned proposal

    def write_tuned_proposal(self, state: dict) -> Path:
        """Save a tuned proposal (``proposals.tune_proposal``: tensors and plain values, naming the
        checkpoint's ``run_id`` and ``step``) atomically beside that checkpoint."""
        atomic_write(self.tuned_proposal_path, lambda tmp: torch.save(state, tmp))
        return self.tuned_proposal_path

    def read_tuned_proposal(self, checkpoint: dict) -> dict:
        """The tuned proposal fitted to ``checkpoint``; a ``RunError`` saying what to do when it is
        missing, unreadable or fitted to other weights (the run trained further, or anew)."""
        path, again = self.tuned_proposal_path, f"pyro-cvae tune-proposal --run-dir {self.path}"
        if not path.is_file():
            raise RunError(
                f"{self.path} has no tuned proposal; fit one with: {again} "
                "(or evaluate with --proposal guide or refined)."
            )
        try:
            state = load_checkpoint_file(path)  # weights_only: a file from elsewhere runs no code
            fitted = (state["run_id"], int(state["step"]))
        except Exception as e:
            raise RunError(
                f"{path} cannot be read ({type(e).__name__}); delete it and tune again: {again}."
            ) from None
        if fitted != (checkpoint.get("run_id"), int(checkpoint["step"])):
            now = (
                f"now at step {checkpoint['step']}"
                if fitted[0] == checkpoint.get("run_id")
                else "trained anew since"
            )
            raise RunError(
                f"{path} is void: it was fitted to step {fitted[1]} of this run, which is {now}; "
                f"tune it again: {again}."
            )
        return state


def runs_in(runs_dir: str | Path) -> list[Run]:
    """The run directories in a runs directory, by name (runs being trained included)."""
    runs_dir = Path(runs_dir)
    problem = _folder_problem(runs_dir)
    if problem:
        raise RunError(problem)
    folders = sorted(runs_dir.iterdir()) if runs_dir.is_dir() else []
    return [Run(p) for p in folders if (p / CHECKPOINT).is_file() or (p / CONFIG).is_file()]


def trained_runs(
    runs_dir: str | Path, log: Callable[[str], None] | None = None
) -> list[tuple[Path, TrainConfig]]:
    """The runs in ``runs_dir`` with at least one epoch trained, and their configs, in the order
    of the variant registry (then by name). A run whose checkpoint or config is refused (corrupt,
    not ours, or holding code) is left out, and ``log`` is told which and why; a folder with
    no checkpoint yet is left out silently (a run not trained yet)."""
    found = []
    for run in runs_in(runs_dir):
        try:
            checkpoint = run.read_checkpoint(mmap=True)
            if checkpoint["epoch"] > 0:
                found.append((run.path, run.config(checkpoint)))
        except (RunError, ValueError) as e:
            if log is not None and run.checkpoint_path.is_file():
                log(f"{run.path.name} left out: {e}")
            continue
    order = list(VARIANTS)
    return sorted(
        found,
        key=lambda run: (
            order.index(run[1].variant) if run[1].variant in order else len(order),
            run[0].name,
        ),
    )


def require_trained_runs(
    runs_dir: str | Path, log: Callable[[str], None] | None = None
) -> list[tuple[Path, TrainConfig]]:
    """``trained_runs``, or a RunError that says how to train one."""
    runs = trained_runs(runs_dir, log)
    if not runs:
        raise RunError(
            f"no trained run in {runs_dir}; train one with: pyro-cvae train --variant joint-scratch "
            f"--runs-dir {runs_dir} (or point --runs-dir at the folder that holds your runs)."
        )
    return runs


def new_run_id() -> str:
    """Names one training from scratch: results of a run trained over again do not count for it."""
    return uuid.uuid4().hex


def load_run(
    run_dir: str | Path,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] | None = None,
) -> tuple[CVAE, TrainConfig, dict]:
    """A trained (or partly trained) run: the model with its weights, its config and checkpoint."""
    return Run(run_dir).load(device, log)


def load_checkpoint_file(path: Path, device: torch.device | str = "cpu", mmap: bool = False) -> Any:
    """The one way a run's checkpoint is read: with ``weights_only``, so that a file holding
    anything but tensors, numbers, strings and containers of them (a pickled object that would
    run code as it loads, in a run folder copied from elsewhere) is refused, not executed."""
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except PermissionError as e:
        raise RunError(f"{path} cannot be read ({e.strerror}); check its permissions.") from None
    except pickle.UnpicklingError as e:
        found = re.search(
            r"WeightsUnpickler error: (.*?)(?: was not an allowed|\.? Please|\n|$)", str(e)
        )
        what = found.group(1) if found else type(e).__name__
        raise RunError(
            f"{path} holds more than weights and numbers ({what}): loading it could run code, so it "
            "is refused; delete it, or train again with --force, unless you trust where it came from."
        ) from None
    except Exception as e:
        raise RunError(
            f"{path} cannot be read ({type(e).__name__}): it is truncated or corrupt; delete it "
            "and train again with --force."
        ) from None


# what a saved evaluation's fields must be (``evaluate.Evaluation``); samples and ncll it must hold
_TEXT, _COUNT, _NUMBER = "text", "count", "number"
_EVALUATION_FIELDS = {
    "run_dir": _TEXT,
    "variant": _TEXT,
    "split": _TEXT,
    "mask": _TEXT,
    "proposal": _TEXT,
    "run_id": _TEXT,
    "proposal_detail": _TEXT,
    "proposal_id": _TEXT,
    "epochs": _COUNT,
    "inputs": _COUNT,
    "samples": _COUNT,
    "images": _COUNT,
    "seed": _COUNT,
    "step": _COUNT,
    "ncll": _NUMBER,
    "ncll_se": _NUMBER,
    "ess_mean": _NUMBER,
    "seconds": _NUMBER,
}
_MAX_NCLL = (
    1e6  # nats per image: far beyond any model's (784 pixels), far below what overflows a plot
)


def _evaluation_problem(record: Any) -> str | None:
    """Why a saved evaluation cannot be used (a field of the wrong type, not finite, out of
    range), or None. ``ncll_se`` may be NaN (one image has no standard error); None where a
    field may be absent (``inputs``, ``step``, ``run_id``)."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if "samples" not in record or "ncll" not in record:
        return "no samples or ncll"
    for name, kind in _EVALUATION_FIELDS.items():
        value = record.get(name)
        if value is None and name not in ("samples", "ncll"):
            continue
        if kind == _TEXT:
            ok = isinstance(value, str)
        elif kind == _COUNT:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok = ok and (math.isfinite(value) or (name == "ncll_se" and math.isnan(value)))
        if not ok:
            return f"{name} is {value!r}"
    if record["samples"] < 1 or abs(record["ncll"]) > _MAX_NCLL or record.get("images") == 0:
        return "samples, images or ncll out of range"
    return None


def _checkpoint_problem(checkpoint: Any) -> str | None:
    if not isinstance(checkpoint, dict):
        return f"a {type(checkpoint).__name__}, not a dict"
    missing = [k for k in _CHECKPOINT_KEYS if k not in checkpoint]
    if missing:
        return f"no {', '.join(missing)}"
    wrong = [k for k, kind in _CHECKPOINT_KEYS.items() if not isinstance(checkpoint[k], kind)]
    return f"{', '.join(wrong)} of the wrong type" if wrong else None


def _read_text(path: Path) -> str | None:
    return read_regular_text(path)


def _folder_problem(path: Path) -> str | None:
    """Why ``path`` cannot be (or be made) a folder: it, or a folder above it, is a file or a
    symbolic link to nothing."""
    for p in (path, *path.parents):
        if p.is_symlink() and not p.exists():
            return (
                f"{p} is a symbolic link to {os.readlink(p)}, which does not exist; create that "
                "folder or name another one."
            )
        if p.exists():
            if p.is_dir():
                return None
            return f"{p} is a file, not a folder; name a folder (or a new path) instead."
    return None


def check_output(out: str | Path, force: bool = False) -> None:
    """Refuse an ``--out`` that would replace a file of a run (checkpoint, config, metrics,
    evaluations, lock, log: never), or an existing file that is not a picture this program
    wrote (unless ``force``)."""
    out = Path(out)
    target = Path(os.path.realpath(out))  # a symbolic link is written through
    if target.is_dir():
        raise OptionError(f"--out {out} is a folder; name a .png file (in it, say).")
    if _is_run_file(target):
        raise OptionError(
            f"--out {out} is a file of the run in {target.parent}, which a picture must never "
            "replace; choose another path."
        )
    if (target.exists() or target.is_symlink()) and not force and not is_our_png(target):
        raise OptionError(
            f"--out {out} exists and is not a picture this program wrote; choose another path, "
            "or pass --force to replace it."
        )


PNG_MARK = b"tEXtSoftware\x00pyro-cvae"  # the text chunk ``plots.save_png`` writes


def is_our_png(path: Path) -> bool:
    """Whether ``path`` is a regular file holding a PNG this program wrote."""
    head = read_regular_bytes(path, 4096) or b""
    return head.startswith(b"\x89PNG\r\n\x1a\n") and PNG_MARK in head


def _is_run_file(path: Path) -> bool:
    named = path.name in (CHECKPOINT, CONFIG, METRICS, LOCK, SWEEP_LOG) or re.fullmatch(
        r"eval-.+\.json", path.name
    )
    folder = path.parent
    return bool(named) and ((folder / CHECKPOINT).exists() or (folder / CONFIG).exists())
