"""MNIST: where it lives, whether it is intact, how it loads; and the quadrant masks.

The one place that reads MNIST. Images come back as one float32 tensor ``(N, 784)`` in
[0, 1] (grey values, not binarised) so that batching is plain indexing.
"""

from __future__ import annotations

import enum
import gzip
import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .atomic import atomic_write_text

SIDE = 28
PIXELS = SIDE * SIDE


class Mask(str, enum.Enum):
    """Masking protocol: ``random`` (one of four quadrants visible, the reference's) or ``fixed``."""

    random = "random"
    fixed = "fixed"


class Split(str, enum.Enum):
    """An MNIST split."""

    test = "test"
    train = "train"


# file stem -> (md5 of the uncompressed IDX bytes, expected leading dimensions)
FILES = {
    "train-images-idx3-ubyte": ("6bbc9ace898e44ae57da46a324031adb", (60000, 28, 28)),
    "train-labels-idx1-ubyte": ("a25bea736e30d166cdddb491f175f624", (60000,)),
    "t10k-images-idx3-ubyte": ("2646ac647ad5339dbf082846283269ea", (10000, 28, 28)),
    "t10k-labels-idx1-ubyte": ("27ae3e4e09519cfbb04c329615203637", (10000,)),
}
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def split_size(split: str) -> int:
    """Images in a split of the verified MNIST files."""
    return FILES[SPLIT_FILES[split][0]][1][0]


def whole_split_limit(limit: int | None, size: int) -> int | None:
    """A limit on the first images of a split of ``size``, as evaluations name it: None when it
    covers the whole split; a limit beyond it is refused, not quietly cut."""
    check_limit(limit, size)
    return None if limit is None or limit >= size else limit


def check_limit(limit: int | None, size: int, what: str = "--limit") -> None:
    """Refuse a limit on the first images that is not positive, or more than the ``size`` there are."""
    if limit is not None and not 1 <= limit <= size:
        fix = "a positive number" if limit < 1 else f"at most {size}, or drop it to use them all"
        raise ValueError(f"{what} {limit} asks for {limit} of {size} images; ask for {fix}.")


IDX_MAGIC = {3: 2051, 1: 2049}  # number of dimensions -> magic number of a uint8 IDX file
DATA_ENV = "PYRO_CVAE_DATA"


class DataError(RuntimeError):
    """MNIST is missing or damaged; the message says which file and what to do."""


def cache_dir() -> Path:
    """Per-user cache folder: downloaded MNIST and the record of verified files."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "pyro-cvae"


def _cache_problem() -> str | None:
    """Why the cache folder must not be made: the home folder it would go in does not exist
    (a service account's ``HOME=/nonexistent``); a folder is never made in its place."""
    if os.environ.get("XDG_CACHE_HOME"):
        return None
    home = Path.home()
    return None if home.is_dir() else f"the home folder {home} does not exist"


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """Explicit argument, else ``$PYRO_CVAE_DATA``, else the cache folder."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return cache_dir() / "mnist"


def _candidates(data_dir: Path, stem: str) -> list[Path]:
    """Where a file may sit: flat (raw or gzipped) or in torchvision's ``MNIST/raw`` layout."""
    return [d / (stem + ext) for d in (data_dir, data_dir / "MNIST" / "raw") for ext in ("", ".gz")]


def find_file(data_dir: Path, stem: str) -> Path | None:
    return next((p for p in _candidates(data_dir, stem) if p.is_file()), None)


def _missing_message(data_dir: Path, missing: list[str], why: str = "") -> str:
    return (
        f"MNIST not found: {', '.join(missing)} missing in {data_dir} (also looked in "
        f"{data_dir / 'MNIST' / 'raw'}){why}. Point --data-dir or {DATA_ENV} at a folder holding "
        "the four IDX files (raw or .gz), e.g. PYRO_CVAE_DATA=../shared/mnist."
    )


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except PermissionError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror}); check its permissions.") from None
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
        raise DataError(
            f"{path}: cannot be read ({type(e).__name__}: {e}); the file is truncated or corrupt, "
            "replace it with an intact copy."
        ) from None


def _parse_idx(raw: bytes, path: Path, stem: str) -> np.ndarray:
    """Decode a uint8 IDX file, checking its header against what MNIST must be."""
    shape = FILES[stem][1]
    header = 4 + 4 * len(shape)
    if len(raw) < header:
        raise DataError(
            f"{path}: only {len(raw)} bytes, too short for an IDX header; replace the file."
        )
    magic = int.from_bytes(raw[0:4], "big")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(len(shape)))
    if magic != IDX_MAGIC[len(shape)] or dims != shape:
        raise DataError(
            f"{path}: header says magic {magic} and shape {dims}, expected {IDX_MAGIC[len(shape)]} "
            f"and {shape}; this is not the MNIST file {stem}."
        )
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(
            f"{path}: {len(raw)} bytes after decompression, expected {expected}; the file is truncated."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _verified_record() -> Path:
    return cache_dir() / "verified.json"


def _fingerprint(path: Path) -> str:
    """Changes when the file's bytes may have: its size, mtime, inode (a replaced file) and
    ctime (which a write sets and no one can set back, unlike a restored mtime)."""
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_ctime_ns}"


def _is_remembered(path: Path) -> bool:
    try:
        return _fingerprint(path) in json.loads(_verified_record().read_text())
    except (OSError, ValueError):
        return False


def _remember(path: Path) -> None:
    """Record that a file passed its checksum, so later runs skip re-hashing it (best effort)."""
    record = _verified_record()
    if _cache_problem():
        return  # verified again next time, rather than a home folder made
    try:
        seen = json.loads(record.read_text()) if record.exists() else []
        seen = sorted(set(seen) | {_fingerprint(path)})
        record.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(seen, indent=0), record)
    except (OSError, ValueError):
        pass


@dataclass
class FileStatus:
    stem: str
    path: Path
    count: int
    checksum: str  # "verified now" or "verified before"


def read_idx(path: Path, stem: str, verify: bool = True) -> tuple[np.ndarray, str]:
    """Read, checksum (once per file version) and decode one MNIST file."""
    remembered = verify and _is_remembered(path)
    raw = _read_bytes(path)
    status = "verified before" if remembered else "not checked"
    if verify and not remembered:
        digest = hashlib.md5(raw).hexdigest()
        if digest != FILES[stem][0]:
            raise DataError(
                f"{path}: md5 of the uncompressed bytes is {digest}, expected {FILES[stem][0]}; "
                "the file is corrupt or not the canonical MNIST, replace it."
            )
        status = "verified now"
    array = _parse_idx(raw, path, stem)
    if verify and not remembered:
        _remember(path)
    return array, status


def _download(data_dir: Path) -> None:
    """torchvision's downloader, into ``data_dir/MNIST/raw``; a clear error where there is no network."""
    from torchvision.datasets import MNIST

    made = [p for p in (data_dir / "MNIST" / "raw", *(data_dir / "MNIST" / "raw").parents)]
    made = [p for p in made if not p.exists()]
    try:
        MNIST(root=str(data_dir), train=True, download=True)
        MNIST(root=str(data_dir), train=False, download=True)
    except Exception as e:  # any network or mirror failure: one actionable line instead
        for folder in made:  # deepest first: the folders made for it, if it left them empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise DataError(
            _missing_message(
                data_dir, ["the MNIST files"], f" and downloading failed ({type(e).__name__})"
            )
        ) from None


def locate(data_dir: str | Path | None = None, download: bool = True) -> Path:
    """The data folder holding all four files; downloads into the cache folder when it is empty."""
    root = resolve_data_dir(data_dir)
    if root.exists() and not root.is_dir():
        raise DataError(
            f"MNIST data folder {root} is a file, not a folder; point --data-dir or {DATA_ENV} at the "
            "folder holding the four IDX files (raw or .gz)."
        )
    missing = [stem for stem in FILES if find_file(root, stem) is None]
    if missing and download and len(missing) == len(FILES) and root == cache_dir() / "mnist":
        if _cache_problem():
            raise DataError(
                _missing_message(root, missing, f", and {_cache_problem()} to download it into")
            )
        _download(root)
        missing = [stem for stem in FILES if find_file(root, stem) is None]
    if missing:
        raise DataError(_missing_message(root, missing))
    return root


def check(data_dir: str | Path | None = None) -> list[FileStatus]:
    """Verify all four files (checksums, headers); raise DataError naming the first bad one."""
    root = locate(data_dir)
    out = []
    for stem in FILES:
        path = find_file(root, stem)
        array, status = read_idx(path, stem)
        out.append(FileStatus(stem, path, array.shape[0], status))
    return out


def load_split(
    split: str, data_dir: str | Path | None = None, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 784)`` float32 in [0, 1] and labels ``(N,)`` int64 of one split."""
    if split not in list(Split):
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(Split)}.")
    root = locate(data_dir)
    image_stem, label_stem = SPLIT_FILES[split]
    images, _ = read_idx(find_file(root, image_stem), image_stem)
    labels, _ = read_idx(find_file(root, label_stem), label_stem)
    check_limit(limit, len(images))
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images_from_pixels(images), torch.from_numpy(labels.astype(np.int64))


def split_pixels(split: str, data_dir: str | Path | None = None) -> np.ndarray:
    """The verified uint8 pixels ``(N, 28, 28)`` of one split: a quarter of the float images'
    size, for shipping to a sweep's workers (``images_from_pixels`` turns them into images)."""
    image_stem = SPLIT_FILES[split][0]
    return read_idx(find_file(locate(data_dir), image_stem), image_stem)[0]


def images_from_pixels(pixels: np.ndarray) -> torch.Tensor:
    """Images ``(N, 784)`` float32 in [0, 1] from uint8 pixels, exactly as ``load_split`` gives them."""
    return torch.from_numpy(pixels.reshape(-1, PIXELS).astype(np.float32) / 255.0)


# ---------------------------------------------------------------------------------------------
# Quadrant masks. Quadrants are numbered 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right.

_rows = torch.arange(SIDE).view(SIDE, 1).expand(SIDE, SIDE)
_cols = torch.arange(SIDE).view(1, SIDE).expand(SIDE, SIDE)
QUADRANT_OF_PIXEL = ((_rows >= SIDE // 2).long() * 2 + (_cols >= SIDE // 2).long()).reshape(PIXELS)
QUADRANTS = torch.stack([QUADRANT_OF_PIXEL == q for q in range(4)])  # (4, 784) bool
FIXED_VISIBLE = {1: (2,), 2: (0, 2), 3: (0, 1, 2)}  # K visible quadrants -> which


def fixed_hidden(inputs: int) -> torch.Tensor:
    """Hidden-pixel mask ``(784,)`` of the fixed protocol with ``inputs`` visible quadrants."""
    if inputs not in FIXED_VISIBLE:
        raise ValueError(f"--inputs must be 1, 2 or 3 visible quadrants, got {inputs}.")
    return ~QUADRANTS[list(FIXED_VISIBLE[inputs])].any(0)


def random_hidden(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Hidden masks ``(n, 784)``: one visible quadrant per image, chosen uniformly."""
    visible = torch.randint(4, (n,), generator=generator)
    return ~QUADRANTS[visible]


def hidden_masks(
    n: int, mask: str = "random", inputs: int = 1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Hidden masks ``(n, 784)`` bool for either protocol."""
    if mask == Mask.random:
        return random_hidden(n, generator)
    if mask == Mask.fixed:
        return fixed_hidden(inputs).expand(n, PIXELS)
    raise ValueError(f"unknown mask protocol {mask!r}; choose one of {', '.join(Mask)}.")


def evaluation_masks(n: int, mask: str = "random", inputs: int = 1, seed: int = 0) -> torch.Tensor:
    """Masks fixed per image index by ``seed``: every model is evaluated on identical inputs."""
    return hidden_masks(n, mask, inputs, torch.Generator().manual_seed(seed))


def check_images(images: Any, hidden: Any) -> None:
    """A ``ValueError`` saying what was expected unless ``images`` is ``(N, 784)`` float32 in
    [0, 1] with N >= 1 and ``hidden`` a bool mask of the same shape hiding at least one pixel of
    every image: the API's inputs, checked before they give a wrong number or a torch error."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a tensor (N, {PIXELS}), not a {type(images).__name__}.")
    if images.dim() != 2 or images.shape[-1] != PIXELS:
        one = "; for one image use images.unsqueeze(0)" if images.dim() == 1 else ""
        raise ValueError(
            f"images must have shape (N, {PIXELS}), a flattened 28x28 image per row, "
            f"got {tuple(images.shape)}{one}."
        )
    if len(images) == 0:
        raise ValueError("images is an empty batch (0 images); pass at least one image.")
    if images.dtype != torch.float32:
        fix = "images.float()" if images.is_floating_point() else "images.float() / 255"
        raise ValueError(
            f"images must be float32 grey levels in [0, 1], got {images.dtype}; pass {fix} "
            "(load_split gives them so)."
        )
    low, high = torch.aminmax(images)
    if not (0.0 <= low.item() and high.item() <= 1.0):  # NaN fails too
        hint = " (0-255? divide by 255)" if high.item() > 1 else ""
        raise ValueError(
            f"images must lie in [0, 1], got values from {low.item():g} to {high.item():g}{hint}."
        )
    if not isinstance(hidden, torch.Tensor) or hidden.shape != images.shape:
        shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(
            f"hidden must be a mask of the images' shape {tuple(images.shape)}, got {shape}."
        )
    if hidden.dtype != torch.bool:
        raise ValueError(
            f"hidden must be a bool mask (True where a pixel is hidden), got {hidden.dtype}; "
            "pass hidden.bool() if it holds 0 and 1 (evaluation_masks gives one)."
        )
    nothing = (~hidden.any(-1)).nonzero().flatten().tolist()
    if nothing:
        raise ValueError(
            f"hidden hides no pixel of image{'s' if len(nothing) > 1 else ''} {nothing[:5]}"
            f"{'...' if len(nothing) > 5 else ''}: there is nothing to predict; hide a quadrant "
            "at least (evaluation_masks)."
        )


def visible_input(images: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The model's input x: the image with hidden pixels set to -1."""
    return images.masked_fill(hidden, -1.0)


@dataclass
class Batch:
    x: torch.Tensor  # (B, 784) input, hidden pixels -1
    y: torch.Tensor  # (B, 784) the full target image
    hidden: torch.Tensor  # (B, 784) bool, True where the model must predict


def make_batch(images: torch.Tensor, hidden: torch.Tensor) -> Batch:
    return Batch(visible_input(images, hidden), images, hidden)


def epoch_batches(
    images: torch.Tensor,
    batch_size: int,
    epoch: int,
    seed: int,
    mask: str = "random",
    inputs: int = 1,
    start: int = 0,
) -> Iterator[Batch]:
    """One training pass: shuffled order and fresh masks, both a function of (seed, epoch) alone,
    so that a run resumed at batch ``start`` sees exactly the batches it would have seen."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(images), generator=g)
    hidden = hidden_masks(len(images), mask, inputs, g)
    for i in range(start * batch_size, len(images), batch_size):
        idx = order[i : i + batch_size]
        yield make_batch(images[idx], hidden[i : i + batch_size].to(images.device))


def steps_per_epoch(n: int, batch_size: int) -> int:
    return -(-n // batch_size)
