"""Readers: RGB images in every stored form, label maps, and every bad input naming its file."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from algm_d2.data import BadSampleError, SemSegDatasetMapper, read_image, read_sem_seg

from .test_data_helpers import random_image, write_image, write_label


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_rgb_png_round_trip(tmp_path, rng):
    image = random_image(rng, 10, 14)
    assert np.array_equal(read_image(str(write_image(tmp_path / "a.png", image))), image)


def test_jpeg_is_rgb(tmp_path):
    image = np.zeros((16, 16, 3), np.uint8)
    image[..., 0] = 200  # pure red: a BGR/RGB mix-up would put it in channel 2
    out = read_image(str(write_image(tmp_path / "a.jpg", image)))
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert out[..., 0].mean() > 190 and out[..., 2].mean() < 10


def test_grayscale_is_replicated(tmp_path, rng):
    gray = rng.integers(0, 256, (9, 7), dtype=np.uint8)
    out = read_image(str(write_image(tmp_path / "g.png", gray)))
    assert out.shape == (9, 7, 3)
    for channel in range(3):
        assert np.array_equal(out[..., channel], gray)


def test_rgba_drops_alpha(tmp_path, rng):
    rgba = np.concatenate([random_image(rng, 6, 8), np.full((6, 8, 1), 7, np.uint8)], axis=2)
    out = read_image(str(write_image(tmp_path / "a.png", rgba)))
    assert np.array_equal(out, rgba[..., :3])


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_corrupt_and_truncated_images(tmp_path, rng, suffix):
    good = write_image(tmp_path / f"good{suffix}", random_image(rng, 32, 32)).read_bytes()
    cases = {"garbage": rng.integers(0, 256, 300, dtype=np.uint8).tobytes(), "half": good[: len(good) // 2],
             "tail": good[:-2]}  # "tail": only the JPEG end marker / PNG's last bytes missing
    for case, data in cases.items():
        path = tmp_path / f"{case}{suffix}"
        path.write_bytes(data)
        with pytest.raises(BadSampleError, match=str(path)):
            read_image(str(path))


def test_truncated_jpeg_caught_even_when_the_decoder_is_lenient(tmp_path, rng, monkeypatch):
    # Some OpenCV builds return a partly grey image for a truncated JPEG; the reader must not rely on them failing.
    good = write_image(tmp_path / "good.jpg", random_image(rng, 32, 32)).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(good[:-2])
    monkeypatch.setattr("algm_d2.data.readers.cv2.imdecode", lambda data, flags: np.zeros((32, 32, 3), np.uint8))
    assert read_image(str(tmp_path / "good.jpg")).shape == (32, 32, 3)
    with pytest.raises(BadSampleError, match="truncated JPEG.*cut.jpg"):
        read_image(str(tmp_path / "cut.jpg"))


def test_empty_and_missing(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(BadSampleError, match="empty.*empty.jpg"):
        read_image(str(tmp_path / "empty.jpg"))
    with pytest.raises(FileNotFoundError, match="nothing.jpg"):
        read_image(str(tmp_path / "nothing.jpg"))
    with pytest.raises(FileNotFoundError, match="nothing.png"):
        read_sem_seg(str(tmp_path / "nothing.png"))


def test_label_map_forms(tmp_path, rng):
    label = rng.integers(0, 20, (5, 6)).astype(np.uint8)
    assert np.array_equal(read_sem_seg(str(write_label(tmp_path / "l.png", label))), label)
    # palette PNG: the indices, not the palette colors
    palette = Image.fromarray(label, mode="P")
    palette.putpalette(list(rng.integers(0, 256, 768)))
    palette.save(tmp_path / "p.png")
    assert np.array_equal(read_sem_seg(str(tmp_path / "p.png")), label)
    wide = (label.astype(np.uint16) * 1000)
    out = read_sem_seg(str(write_label(tmp_path / "w.png", wide)))
    assert out.dtype == np.uint16 and np.array_equal(out, wide)


def test_label_map_errors(tmp_path, rng):
    color = write_image(tmp_path / "color.png", random_image(rng, 4, 4))
    with pytest.raises(BadSampleError, match="one channel.*color.png"):
        read_sem_seg(str(color))
    good = write_label(tmp_path / "good.png", np.zeros((40, 40), np.uint8)).read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(BadSampleError, match="cut.png"):
        read_sem_seg(str(tmp_path / "cut.png"))
    label = np.array([[0, 1, 255], [7, 9, 2]], np.uint8)
    path = write_label(tmp_path / "range.png", label)
    with pytest.raises(BadSampleError, match=r"7, 9 in .*range\.png"):
        read_sem_seg(str(path), num_classes=5)
    assert np.array_equal(read_sem_seg(str(path), num_classes=10), label)  # 255 is the ignore label


def test_size_mismatch_names_both_files(tmp_path, rng):
    image = write_image(tmp_path / "img.png", random_image(rng, 10, 12))
    label = write_label(tmp_path / "lab.png", np.zeros((10, 11), np.uint8))
    mapper = SemSegDatasetMapper(is_train=False, num_classes=3)
    with pytest.raises(BadSampleError, match=r"img\.png is 10x12 .*lab\.png is 10x11"):
        mapper({"file_name": str(image), "sem_seg_file_name": str(label)})
    with pytest.raises(BadSampleError, match=r"img\.png is 10x12 but its record says 10x13"):
        mapper({"file_name": str(image), "height": 10, "width": 13})
