"""restorer.image.pixels: the image conventions every module shares."""

import numpy as np
import pytest

from restorer.image import degrade, pixels
from restorer.io import codec
from restorer.quality import evaluate


def test_to_float_spans_0_to_1_for_both_depths():
    assert pixels.to_float(np.array([0, 128, 255], np.uint8)).tolist() == pytest.approx(
        [0.0, 128 / 255, 1.0])
    values = pixels.to_float(np.array([0, 257, 65535], np.uint16))
    assert values.dtype == np.float32 and values.tolist() == pytest.approx([0.0, 1 / 255, 1.0])
    with pytest.raises(ValueError, match="float32 is neither uint8 nor uint16"):
        pixels.to_float(np.zeros(2, np.float32))


def test_the_two_uint8_conversions_do_two_different_things():
    # float [0, 1] -> uint8: clamp, x255, round (measuring)
    floats = np.array([-0.2, 0.0, 0.5, 1.0, 1.7], np.float32)
    assert pixels.float_to_uint8(floats).tolist() == [0, 0, 128, 255, 255]
    # uint16 -> uint8: / 257, round (8-bit formats); uint8 passes through untouched
    deep = np.array([0, 128, 129, 257, 65535], np.uint16)
    assert pixels.to_8bit(deep).tolist() == [0, 0, 1, 1, 255]
    eight = np.array([3, 250], np.uint8)
    assert pixels.to_8bit(eight) is eight
    # round trips: 8-bit through float, and every 8-bit level through 16-bit (x257)
    levels = np.arange(256, dtype=np.uint8)
    assert np.array_equal(pixels.float_to_uint8(pixels.to_float(levels)), levels)
    assert np.array_equal(pixels.to_8bit(levels.astype(np.uint16) * 257), levels)


def test_gray_is_one_plane_or_equal_planes():
    plane = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert pixels.is_gray(plane) and pixels.is_gray(plane[..., None])
    assert pixels.is_gray(np.repeat(plane[..., None], 3, axis=2))
    color = np.repeat(plane[..., None], 3, axis=2)
    color[1, 2, 0] += 1
    assert not pixels.is_gray(color)


def test_one_definition_under_the_former_names():
    """codec.to_uint8, evaluate.to_uint8 and degrade.is_gray are these functions, not copies."""
    assert codec.to_uint8 is pixels.to_8bit
    assert evaluate.to_uint8 is pixels.float_to_uint8
    assert degrade.is_gray is pixels.is_gray


def test_planes_for_a_net_use_pillows_luma_and_equal_planes(rng):
    """A colour file shown to a gray net is its luma, as Pillow's "L" (how evaluation reads
    test images), in training too; a gray image shown to a colour net is three equal planes."""
    from PIL import Image

    rgb = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    luma = pixels.to_planes(pixels.to_float(rgb), 1)
    pillow = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float32) / 255
    assert luma.shape == (9, 11) and np.abs(luma - pillow).max() <= 1 / 255
    assert not np.allclose(luma, pixels.to_float(rgb).mean(-1), atol=1 / 255)  # not the mean
    gray = pixels.to_float(rgb[..., :1])
    assert np.array_equal(pixels.to_planes(gray, 1), gray[..., 0])
    three = pixels.to_planes(gray, 3)
    assert three.shape == (9, 11, 3) and pixels.is_gray(three)
    assert np.array_equal(pixels.to_planes(pixels.to_float(rgb), 3), pixels.to_float(rgb))
    with pytest.raises(ValueError, match="channels"):
        pixels.to_planes(gray, 2)
