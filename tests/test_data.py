import gzip
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pyro_cvae import data
from pyro_cvae.cli import app


def test_data_dir_resolution_order(monkeypatch, tmp_path):
    monkeypatch.setenv("PYRO_CVAE_DATA", str(tmp_path / "env"))
    assert data.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert data.resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("PYRO_CVAE_DATA")
    assert data.resolve_data_dir(None) == tmp_path / "cache" / "pyro-cvae" / "mnist"


def test_real_mnist_verifies_and_loads(mnist_dir):
    statuses = data.check(mnist_dir)
    assert [s.count for s in statuses] == [60000, 60000, 10000, 10000]
    assert all(s.checksum == "verified now" for s in statuses)
    # remembered: the second check does not hash again
    assert all(s.checksum == "verified before" for s in data.check(mnist_dir))
    images, labels = data.load_split("test", mnist_dir)
    assert images.shape == (10000, 784) and images.dtype == torch.float32
    assert data.split_size("test") == len(images) and data.split_size("train") == 60000
    # a limit covering the split names the whole split (one evaluation file, not two for the same images)
    assert data.whole_split_limit(10000, data.split_size("test")) is None
    assert data.whole_split_limit(9999, data.split_size("test")) == 9999
    assert (
        data.whole_split_limit(10000, data.split_size("train")) == 10000
        and data.whole_split_limit(None, 60000) is None
    )
    assert images.min() == 0.0 and images.max() == 1.0
    assert ((images > 0) & (images < 1)).any(), "grey values, not binarised"
    assert labels.shape == (10000,) and set(labels.tolist()) == set(range(10))
    train, _ = data.load_split("train", mnist_dir, limit=100)
    assert train.shape == (100, 784)


def _copy_mnist(src: Path, dst: Path) -> Path:
    """A data folder with the real label files copied (to damage) and the image files linked."""
    dst.mkdir()
    for stem in data.FILES:
        source = data.find_file(src, stem)
        if "labels" in stem:
            shutil.copy(source, dst / source.name)
        else:
            (dst / source.name).symlink_to(source.resolve())
    return dst


def test_truncated_gzip_gives_clear_error(mnist_dir, tmp_path):
    folder = _copy_mnist(mnist_dir, tmp_path / "d")
    path = folder / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(
        data.DataError, match=r"t10k-labels-idx1-ubyte.gz: cannot be read .*truncated or corrupt"
    ):
        data.check(folder)


def test_flipped_byte_fails_checksum(mnist_dir, tmp_path):
    folder = _copy_mnist(mnist_dir, tmp_path / "d")
    path = folder / "train-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[100] ^= 0xFF
    path.unlink()
    (folder / "train-labels-idx1-ubyte").write_bytes(
        bytes(raw)
    )  # raw (uncompressed) files are accepted too
    with pytest.raises(data.DataError, match=r"train-labels-idx1-ubyte: md5 .* expected a25bea73"):
        data.check(folder)


def test_missing_file_names_it_and_the_fix(mnist_dir, tmp_path):
    folder = _copy_mnist(mnist_dir, tmp_path / "d")
    (folder / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(data.DataError, match=r"t10k-images-idx3-ubyte missing in .*PYRO_CVAE_DATA"):
        data.check(folder)


def test_torchvision_layout_is_found(mnist_dir, tmp_path):
    raw = tmp_path / "root" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in data.FILES:
        source = data.find_file(mnist_dir, stem)
        (raw / source.name).symlink_to(source.resolve())
    assert [s.count for s in data.check(tmp_path / "root")] == [60000, 60000, 10000, 10000]


def test_wrong_header_is_named(tmp_path):
    bad = tmp_path / "t10k-labels-idx1-ubyte"
    bad.write_bytes((2049).to_bytes(4, "big") + (5).to_bytes(4, "big") + bytes(5))
    with pytest.raises(data.DataError, match="shape"):
        data.read_idx(bad, "t10k-labels-idx1-ubyte", verify=False)


def test_cli_data_reports_and_fails_cleanly(mnist_dir, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["data", "--data-dir", str(mnist_dir)])
    assert ok.exit_code == 0, ok.output
    assert "60000" in ok.output and "10000" in ok.output and "OK" in ok.output
    (tmp_path / "empty").mkdir()
    bad = runner.invoke(app, ["data", "--data-dir", str(tmp_path / "empty")])
    assert bad.exit_code == 1
    assert "MNIST not found" in bad.output and "Traceback" not in bad.output
    corrupt = _copy_mnist(mnist_dir, tmp_path / "corrupt")
    (corrupt / "train-labels-idx1-ubyte.gz").write_bytes(b"not a gzip file at all")
    bad = runner.invoke(app, ["data", "--data-dir", str(corrupt)])
    assert (
        bad.exit_code == 1
        and "train-labels-idx1-ubyte.gz" in bad.output
        and "Traceback" not in bad.output
    )


# ------------------------------------------------------------------ masks


def _visible_quadrants(hidden_row: torch.Tensor) -> set[int]:
    return {q for q in range(4) if not hidden_row[data.QUADRANTS[q]].any()}


def test_random_masks_hide_three_whole_quadrants():
    hidden = data.hidden_masks(400, "random", generator=torch.Generator().manual_seed(1))
    assert hidden.shape == (400, 784) and hidden.dtype == torch.bool
    assert (hidden.sum(1) == 3 * 196).all()
    for row in hidden[:50]:
        visible = _visible_quadrants(row)
        assert len(visible) == 1
        assert row[~data.QUADRANTS[next(iter(visible))]].all()
    counts = torch.stack([(~hidden[:, data.QUADRANTS[q]]).all(1) for q in range(4)]).sum(1)
    assert (counts > 60).all(), f"visible quadrant should be uniform, got {counts.tolist()}"


@pytest.mark.parametrize(
    "k,visible,hidden_count", [(1, {2}, 588), (2, {0, 2}, 392), (3, {0, 1, 2}, 196)]
)
def test_fixed_masks(k, visible, hidden_count):
    hidden = data.hidden_masks(5, "fixed", inputs=k)
    assert (hidden.sum(1) == hidden_count).all()
    assert _visible_quadrants(hidden[0]) == visible
    # K=1 is the bottom-left quadrant: row 20, column 5
    assert not hidden[0, 20 * 28 + 5]


def test_fixed_mask_rejects_bad_k():
    with pytest.raises(ValueError, match="1, 2 or 3"):
        data.fixed_hidden(4)


def test_hidden_input_pixels_are_minus_one():
    images = torch.rand(8, 784)
    hidden = data.hidden_masks(8)
    x = data.visible_input(images, hidden)
    assert (x[hidden] == -1).all()
    assert torch.equal(x[~hidden], images[~hidden])


def test_evaluation_masks_are_deterministic_and_training_masks_random():
    assert torch.equal(data.evaluation_masks(100, seed=0), data.evaluation_masks(100, seed=0))
    assert not torch.equal(data.evaluation_masks(100, seed=0), data.evaluation_masks(100, seed=1))
    images = torch.rand(64, 784)
    e0 = torch.cat([b.hidden for b in data.epoch_batches(images, 16, epoch=0, seed=0)])
    e1 = torch.cat([b.hidden for b in data.epoch_batches(images, 16, epoch=1, seed=0)])
    assert not torch.equal(e0, e1), "training draws new masks every pass"


def test_epoch_batches_cover_the_split_and_resume_exactly():
    images = torch.rand(50, 784)
    batches = list(data.epoch_batches(images, 16, epoch=3, seed=7))
    assert [len(b.y) for b in batches] == [16, 16, 16, 2]
    seen = torch.cat([b.y for b in batches])
    assert torch.equal(seen.sort(0).values, images.sort(0).values)
    for b in batches:
        assert torch.equal(b.x, data.visible_input(b.y, b.hidden))
    resumed = list(data.epoch_batches(images, 16, epoch=3, seed=7, start=2))
    assert all(torch.equal(a.x, b.x) for a, b in zip(batches[2:], resumed))


def test_no_network_gives_the_clear_message(monkeypatch, tmp_path):
    """With nothing in the cache folder, torchvision's downloader is tried; when it fails, one
    line says where we looked and how to point at a folder with the files."""
    import torchvision.datasets

    calls = []

    class Offline:
        def __init__(self, root, train, download):
            calls.append(root)
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.delenv("PYRO_CVAE_DATA", raising=False)
    monkeypatch.setattr(torchvision.datasets, "MNIST", Offline)
    with pytest.raises(
        data.DataError, match=r"MNIST not found.*downloading failed \(RuntimeError\).*--data-dir"
    ):
        data.load_split("test")
    assert calls == [str(tmp_path / "cache" / "pyro-cvae" / "mnist")]
