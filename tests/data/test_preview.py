"""raymix preview: a PNG grid of training images and their two augmented views."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raymix.cli import main
from raymix.config import load_config
from raymix.data.datasets import ImageData
from raymix.data.preview import PAD, cell_size, grid_shape, preview_rows, write_png

ROOT = Path(__file__).parents[2]
DIGITS = ROOT / "launch" / "experiments" / "digits.yaml"


def _cells(path: Path, rows: int, cell: int) -> list[list[np.ndarray]]:
    """The (cell, cell, 3) pixels of each grid cell of the PNG at ``path``, row by row."""
    pixels = np.asarray(Image.open(path).convert("RGB"))
    step = cell + PAD
    return [
        [
            pixels[PAD + r * step : PAD + r * step + cell, PAD + c * step : PAD + c * step + cell]
            for c in range(3)
        ]
        for r in range(rows)
    ]


def _check_preview(path: Path, rows: int, image_size: int) -> list[list[np.ndarray]]:
    """Size and content of a written preview: every view differs from its row's original."""
    cell = cell_size(image_size)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[::-1] == grid_shape(rows, image_size)
    cells = _cells(path, rows, cell)
    for original, view1, view2 in cells:
        assert not np.array_equal(view1, original) and not np.array_equal(view2, original)
        assert not np.array_equal(view1, view2)
    return cells


def test_preview_digits_cli_writes_a_deterministic_grid(tmp_path, capsys):
    out = tmp_path / "new" / "folder" / "digits.png"  # the folder is created
    args = ["preview", str(DIGITS), "--out", str(out), "--count", "3", "method.name=selfcon"]
    assert main(args) == 0
    assert str(out) in capsys.readouterr().out
    assert cell_size(16) == 96  # 16-pixel digits are enlarged 6x
    first = out.read_bytes()
    _check_preview(out, rows=3, image_size=16)
    assert main(args) == 0
    assert out.read_bytes() == first
    assert [p.name for p in out.parent.iterdir()] == ["digits.png"]  # no temporary file left
    # Another seed: other images.
    assert main([*args, "training.seed=1"]) == 0
    assert out.read_bytes() != first


def test_identity_augmentation_gives_back_the_originals():
    """With every augmentation off, both views are the stored images: un-normalisation is exact."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8, generator=generator)
    data = ImageData(images, torch.arange(5) % 2, 2, (0.3, 0.5, 0.7), (0.2, 0.25, 0.3))
    off = [
        "data.image_size=8", "augment.crop_scale=[1,1]", "augment.crop_ratio=[1,1]",
        "augment.flip_prob=0", "augment.jitter_prob=0", "augment.grayscale_prob=0",
        "augment.blur_prob=[0,0]", "augment.solarize_prob=[0,0]",
    ]  # fmt: skip
    rows = preview_rows(load_config(None, off), count=4, data=data)
    assert len(set(rows.indices)) == 4 and rows.labels == [int(data.labels[i]) for i in rows.indices]
    assert rows.originals.shape == (4, 3, 96, 96) and rows.originals.dtype == torch.uint8
    assert torch.equal(rows.originals[:, :, ::12, ::12], images[rows.indices])
    for view in (rows.view1, rows.view2):
        assert (view.int() - rows.originals.int()).abs().max() <= 1
    # More images asked for than there are: all of them.
    assert len(preview_rows(load_config(None, off), count=50, data=data).indices) == 5


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    """6 JPEGs of 40-60 px in 2 classes, in train/ and val/."""
    generator = np.random.default_rng(0)
    for split in ("train", "val"):
        for label, name in enumerate(("cat", "dog")):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(3):
                width, height = 40 + 5 * i, 60 - 2 * i  # portrait
                # A colour gradient with noise: crops and colour changes show.
                ramp = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3))
                ramp[..., label] = 255 - ramp[..., label]
                pixels = ramp + generator.normal(0, 20, ramp.shape)
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.jpg")
    return tmp_path


def test_preview_imagefolder_cli(image_root, tmp_path):
    out = tmp_path / "folder.png"
    args = [
        "preview", str(DIGITS), "data.name=imagefolder", f"data.root={image_root}",
        "data.image_size=32", "--out", str(out), "--count", "4",
    ]  # fmt: skip
    assert main(args) == 0
    cells = _check_preview(out, rows=4, image_size=32)
    # The original is the whole image letterboxed: portrait images leave black bars left and right.
    for original, _, _ in cells:
        assert original.shape == (96, 96, 3)
        assert original[:, :3].max() == 0 and original[:, -3:].max() == 0
        assert original[40:56, 40:56].mean() > 20
    first = out.read_bytes()
    assert main(args) == 0
    assert out.read_bytes() == first


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "{tmp}/preview.jpg"], "--out '{tmp}/preview.jpg'"),
        (["--out", "{tmp}/preview.png", "data.nope=1"], "unknown key 'data.nope'"),
        (["--out", "{tmp}/preview.png", "--count", "0"], "--count 0"),
    ],
)
def test_preview_bad_input_exit_2_nothing_written(tmp_path, capsys, args, message):
    args = [arg.format(tmp=tmp_path / "out") for arg in args]
    assert main(["preview", str(DIGITS), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raymix: error:") and "\n" not in err
    assert message.format(tmp=tmp_path / "out") in err
    assert not (tmp_path / "out").exists()


def test_write_png_is_atomic(tmp_path, monkeypatch):
    """A failed write leaves neither a partial file nor a temporary one; an old file stays whole."""
    out = tmp_path / "grid.png"
    grid = torch.zeros(3, 4, 6, dtype=torch.uint8)
    write_png(grid, out)
    before = out.read_bytes()

    def broken_save(self, fp, format=None, **params):  # noqa: A002 - PIL's own signature
        fp.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_png(grid + 1, out)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]
