"""Pair composition: every input type and Pillow mode, EXIF, size policies, the processor maths."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from idc_lite.compose import compose_batch, compose_pair, load_image, preprocess, stack_pair, to_rgb
from idc_lite.errors import InputError
from idc_lite.settings import CLIP_MEAN, CLIP_STD, CompositionSettings, ProcessorSettings

SMALL = ProcessorSettings(height=8, width=4)


def solid(color, size=(4, 2), mode="RGB"):
    return Image.new(mode, size, color)


def test_stacks_before_on_top_and_matches_a_hand_computed_tensor():
    # 4x2 red over 4x2 blue -> a 4x4 canvas; the processor keeps 4x4 (no resize) and normalises.
    processor = ProcessorSettings(height=4, width=4)
    pixels = compose_pair(solid((255, 0, 0)), solid((0, 0, 255)), processor=processor)
    assert pixels.shape == (3, 4, 4) and pixels.dtype == np.float32
    expected = np.empty((3, 4, 4), dtype=np.float32)
    for c in range(3):
        top, bottom = (1.0 if c == 0 else 0.0), (1.0 if c == 2 else 0.0)
        expected[c, :2] = (top - CLIP_MEAN[c]) / CLIP_STD[c]
        expected[c, 2:] = (bottom - CLIP_MEAN[c]) / CLIP_STD[c]
    np.testing.assert_allclose(pixels, expected, atol=1e-6)


def test_canvas_is_before_height_plus_after_height():
    canvas = stack_pair(solid((1, 2, 3), (10, 7)), solid((4, 5, 6), (10, 5)), CompositionSettings("smallest"))
    # heights differ: both go to the smaller one (5), so the canvas is 10 x 10
    assert canvas.size == (10, 10)
    assert canvas.getpixel((0, 0)) == (1, 2, 3) and canvas.getpixel((0, 9)) == (4, 5, 6)


def test_size_policy_smallest_resizes_both_with_lanczos():
    before, after = Image.new("RGB", (40, 30)), Image.new("RGB", (30, 40))
    before.paste((200, 10, 10), (0, 0, 20, 30))
    canvas = stack_pair(before, after, CompositionSettings("smallest"))
    assert canvas.size == (30, 60)
    expected_top = np.asarray(before.resize((30, 30), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(np.asarray(canvas)[:30], expected_top)


def test_size_policy_after_resizes_before_to_after_with_bicubic():
    before, after = Image.new("RGB", (40, 30), (9, 9, 9)), Image.new("RGB", (20, 10), (7, 7, 7))
    before.paste((250, 0, 0), (0, 0, 13, 30))
    canvas = stack_pair(before, after, CompositionSettings("after"))
    assert canvas.size == (20, 20)
    np.testing.assert_array_equal(np.asarray(canvas)[:10], np.asarray(before.resize((20, 10), Image.Resampling.BICUBIC)))


def test_size_policy_strict_refuses_different_sizes():
    with pytest.raises(InputError, match="differs"):
        stack_pair(solid(0, (4, 4)), solid(0, (5, 4)), CompositionSettings("strict"))
    with pytest.raises(ValueError):
        CompositionSettings("stretch")


def test_processor_equals_transformers_blip_image_processor():
    from transformers import BlipImageProcessorPil

    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (50, 37, 3), dtype=np.uint8))
    ours = preprocess(image, ProcessorSettings(height=32, width=32))
    theirs = BlipImageProcessorPil(size={"height": 32, "width": 32})(image, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_processor_settings_are_read_from_the_model_dir(tiny_model):
    settings = ProcessorSettings.from_model_dir(tiny_model)
    assert (settings.height, settings.width, settings.resample) == (32, 32, 3)
    assert settings.image_mean == CLIP_MEAN and settings.image_std == CLIP_STD


def test_all_input_types_give_the_same_tensor(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(array).save(path)
    inputs = [path, str(path), path.read_bytes(), bytearray(path.read_bytes()), Image.fromarray(array), array]
    tensors = [compose_pair(x, x, processor=SMALL) for x in inputs]
    for tensor in tensors[1:]:
        np.testing.assert_array_equal(tensor, tensors[0])


def test_batch_stacks_pairs(pairs):
    batch = compose_batch(pairs[:3], processor=SMALL)
    assert batch.shape == (3, 3, 8, 4)
    np.testing.assert_array_equal(batch[1], compose_pair(*pairs[1], processor=SMALL))


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "CMYK", "YCbCr", "HSV", "LAB", "I", "F", "I;16", "I;16B"])
def test_every_opaque_mode_becomes_rgb(mode):
    image = Image.new(mode, (3, 2))
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (3, 2)


def test_mode_conversions_keep_the_colour():
    assert to_rgb(Image.new("L", (1, 1), 100)).getpixel((0, 0)) == (100, 100, 100)
    assert to_rgb(Image.new("1", (1, 1), 1)).getpixel((0, 0)) == (255, 255, 255)
    cmyk = to_rgb(Image.new("CMYK", (1, 1), (0, 255, 255, 0))).getpixel((0, 0))
    assert cmyk == (255, 0, 0)
    # 16-bit scales to 8-bit instead of clipping to white
    assert to_rgb(Image.new("I;16", (1, 1), 32896)).getpixel((0, 0)) == (128, 128, 128)
    assert to_rgb(Image.new("I", (1, 1), 65535)).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("I", (1, 1), 7)).getpixel((0, 0)) == (7, 7, 7)
    assert to_rgb(Image.new("F", (1, 1), 0.5)).getpixel((0, 0)) == (128, 128, 128)
    lab = to_rgb(Image.new("LAB", (1, 1), (100, 128, 128))).getpixel((0, 0))
    assert abs(lab[0] - lab[1]) <= 2 and abs(lab[1] - lab[2]) <= 2  # neutral grey stays grey


@pytest.mark.parametrize("mode,color", [("RGBA", (255, 0, 0, 0)), ("LA", (0, 0)), ("PA", (0, 0)), ("RGBa", (0, 0, 0, 0)), ("La", (0, 0))])
def test_transparent_pixels_become_white(mode, color):
    assert to_rgb(Image.new(mode, (2, 2), color)).getpixel((0, 0)) == (255, 255, 255)


def test_alpha_is_composited_on_white():
    half_red = Image.new("RGBA", (1, 1), (255, 0, 0, 128))
    assert to_rgb(half_red).getpixel((0, 0)) == (255, 127, 127)
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 10, 20, 30])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    assert [to_rgb(palette).getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (10, 20, 30)]


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (4, 2), (0, 0, 0))
    image.putpixel((0, 0), (255, 255, 255))  # top-left white in storage order
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif)
    upright = load_image(buffer.getvalue())
    assert upright.size == (2, 4)
    assert upright.getpixel((1, 0)) == (255, 255, 255)  # the stored top-left shows top-right


def test_arrays_of_other_shapes_and_dtypes():
    gray = np.full((2, 3), 40, np.uint8)
    assert load_image(gray).getpixel((0, 0)) == (40, 40, 40)
    rgba = np.zeros((2, 3, 4), np.uint8)
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(InputError, match="uint8"):
        load_image(np.zeros((2, 3, 3), np.float32))
    with pytest.raises(InputError, match="shape"):
        load_image(np.zeros((2, 3, 2), np.uint8))


def test_bad_files_give_one_line_errors_naming_the_file(tmp_path):
    missing = tmp_path / "missing.png"
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    truncated = tmp_path / "cut.png"
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, format="PNG")
    truncated.write_bytes(buffer.getvalue()[:60])
    cases = [(missing, "no such file"), (tmp_path, "is a folder"), (text, "not an image"),
             (empty, "empty file"), (truncated, "corrupt or truncated")]
    for path, problem in cases:
        with pytest.raises(InputError) as info:
            load_image(path)
        message = str(info.value)
        assert message.startswith(str(path)) and problem in message and "\n" not in message
    with pytest.raises(InputError, match="unsupported input type"):
        load_image(12)
