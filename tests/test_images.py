"""The one image loader of every entry point (vlm_guard.images): 16-bit, EXIF orientation, transparency, CMYK,
pixel caps and decompression bombs, the same through eval, demo, caption and calibrate; the eval cache bounded in
bytes; and find_images on symbolic-link loops."""

import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vlm_guard.calibration.calibrate import find_calibration_images
from vlm_guard.calibration.calibrate import load_image as calibrate_load
from vlm_guard.cli import main
from vlm_guard.cli.caption import _load_image as caption_load
from vlm_guard.demo.inputs import DemoInputError, DemoLimits, validate_image
from vlm_guard.eval.images import ImageLoader
from vlm_guard.images import ImageLoadError, display_name, find_images, load_image


def _entry_points(folder, name):
    """RGB pixels of ``folder/name`` as each entry point reads it."""
    path = folder / name
    return {
        "vlm_guard.images": load_image(path),
        "eval": ImageLoader(folder).load(name),
        "demo": validate_image(str(path), DemoLimits()),
        "caption": caption_load(str(path))[0],
        "calibrate": calibrate_load(path),
    }


def _pixel(image, xy=(0, 0)):
    return tuple(int(v) for v in image.getpixel(xy))


def test_16bit_grey_png_is_scaled_not_clipped_in_every_entry_point(tmp_path):
    # issue 10 item 7: I;16 value 32896 read as (255, 255, 255) instead of (128, 128, 128)
    Image.fromarray(np.full((8, 8), 128 * 257, dtype=np.uint16)).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    for where, image in _entry_points(tmp_path, "grey16.png").items():
        assert image.mode == "RGB", where
        assert _pixel(image) == (128, 128, 128), where
    extremes = np.array([[0, 65535]], dtype=np.uint16)
    Image.fromarray(extremes).save(tmp_path / "extremes.png")
    assert [_pixel(load_image(tmp_path / "extremes.png"), (x, 0)) for x in (0, 1)] == [(0, 0, 0), (255, 255, 255)]


def test_32bit_and_float_grey_are_scaled():
    assert _pixel(load_image(Image.fromarray(np.full((2, 2), 32896, dtype=np.int32)))) == (128, 128, 128)
    assert _pixel(load_image(Image.fromarray(np.full((2, 2), 77, dtype=np.int32)))) == (77, 77, 77)  # already 8-bit
    assert _pixel(load_image(Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32)))) == (128, 128, 128)


def test_exif_orientation_is_applied_in_every_entry_point(tmp_path):
    # a 4x2 landscape image stored sideways with Orientation=6 ("rotate 90 CW to view"): upright it is 2x4,
    # and the stored top-left pixel (red) ends at the top-right
    stored = Image.new("RGB", (4, 2), (0, 0, 255))
    stored.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.png", exif=exif.tobytes())
    for where, image in _entry_points(tmp_path, "phone.png").items():
        assert image.size == (2, 4), where
        assert _pixel(image, (1, 0)) == (255, 0, 0), where


def test_transparency_palette_and_cmyk(tmp_path):
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))  # fully transparent black ...
    rgba.putpixel((1, 0), (200, 10, 10, 255))  # ... beside opaque red
    rgba.save(tmp_path / "rgba.png")
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "palette.png", transparency=0)
    Image.new("CMYK", (2, 1), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    Image.new("LA", (2, 1), (90, 128)).save(tmp_path / "la.png")
    for where, image in _entry_points(tmp_path, "rgba.png").items():
        assert [_pixel(image, (x, 0)) for x in (0, 1)] == [(255, 255, 255), (200, 10, 10)], where
    for where, image in _entry_points(tmp_path, "palette.png").items():
        assert [_pixel(image, (x, 0)) for x in (0, 1)] == [(255, 255, 255), (10, 200, 10)], where
    for where, image in _entry_points(tmp_path, "cmyk.jpg").items():
        assert all(v >= 250 for v in _pixel(image)), where
    grey_on_white = round(90 * 128 / 255 + 255 * (1 - 128 / 255))
    assert all(abs(v - grey_on_white) <= 1 for v in _pixel(load_image(tmp_path / "la.png")))


def _png_declaring(width, height):
    """A few hundred bytes of PNG whose header declares ``width x height`` grey pixels (a decompression bomb)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def test_pixel_cap_and_decompression_bomb_are_refused_before_decoding(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_png_declaring(30000, 30000))  # 900 M pixels, past PIL's own limit
    (tmp_path / "big.png").write_bytes(_png_declaring(9000, 9000))  # 81 M pixels, past our 67 M default
    for name in ("bomb.png", "big.png"):
        with pytest.raises(ImageLoadError, match=f"{name}.*(pixels|decompression bomb)") as error:
            load_image(tmp_path / name)
        assert error.value.kind == "too_many_pixels" and "\n" not in str(error.value)
        loader = ImageLoader(tmp_path)
        assert loader.load(name) is None and name in loader.skipped
        with pytest.raises(ImageLoadError):
            calibrate_load(tmp_path / name)
        with pytest.raises(DemoInputError, match="pixels"):
            validate_image(str(tmp_path / name), DemoLimits(max_image_pixels=10_000))
        with pytest.raises(ValueError, match=name):
            caption_load(str(tmp_path / name))
    Image.new("RGB", (40, 30)).save(tmp_path / "small.png")
    with pytest.raises(ImageLoadError, match=r"40x30 = 1,200 pixels, over the limit of 1,000"):
        load_image(tmp_path / "small.png", max_pixels=1000)
    assert load_image(tmp_path / "small.png", max_pixels=1200).size == (40, 30)


def test_caption_on_a_decompression_bomb_is_one_line(tmp_path, capsys):
    (tmp_path / "bomb.png").write_bytes(_png_declaring(30000, 30000))
    assert main(["caption", str(tmp_path / "bomb.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlm-guard caption: error: ") and "bomb.png" in err and "pixels" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_unreadable_files_give_one_line_errors(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    full = tmp_path / "full.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(full)
    (tmp_path / "truncated.png").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    os.symlink(tmp_path / "nowhere.png", tmp_path / "dangling.png")
    expected = {
        "empty.png": "empty",
        "text.png": "unreadable",
        "truncated.png": "unreadable",
        "missing.png": "missing",
        "dangling.png": "missing",
    }
    for name, kind in expected.items():
        with pytest.raises(ImageLoadError) as error:
            load_image(tmp_path / name)
        assert error.value.kind == kind and name in str(error.value) and "\n" not in str(error.value), name


def test_eval_image_cache_is_bounded_in_bytes(tmp_path):
    for index in range(6):
        Image.new("RGB", (100, 100), (index, 0, 0)).save(tmp_path / f"{index}.png")  # 30,000 bytes decoded
    loader = ImageLoader(tmp_path, cache_bytes=70_000)
    for index in range(6):
        assert _pixel(loader.load(f"{index}.png")) == (index, 0, 0)
        assert loader.cached_bytes <= 70_000
    assert loader.cached_bytes == 60_000 and list(loader._cache) == ["4.png", "5.png"]
    assert loader.load("5.png") is loader.load("5.png")  # served from the cache
    Image.new("RGB", (200, 200)).save(tmp_path / "large.png")  # 120,000 bytes: larger than the whole budget
    assert loader.load("large.png").size == (200, 200) and loader.cached_bytes <= 70_000
    with pytest.raises(ValueError, match="cache_bytes"):
        ImageLoader(tmp_path, cache_bytes=-1)


def test_display_name_survives_non_utf8_file_names(tmp_path):
    name = os.fsdecode(b"caf\xe9.png")  # a Latin-1 name on a UTF-8 system: a lone surrogate in Python
    assert display_name(name) == "caf\\xe9.png"
    display_name(name).encode("utf-8")  # printable under a strict UTF-8 locale
    with pytest.raises(ImageLoadError) as error:
        load_image(tmp_path / name)
    str(error.value).encode("utf-8")


# ---------------------------------------------------------------------------------------------- finding images
@pytest.fixture
def linked_tree(tmp_path):
    """root/a/x.png, root/a/b/y.png, root/top.png; a loop (a/b/up -> root), a second way in (c/to_a -> a), a
    dangling link, a link to itself, and a second name for a/x.png."""
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "c").mkdir()
    for relative in ("a/x.png", "a/b/y.png", "top.png"):
        Image.new("RGB", (8, 8), (40, 80, 120)).save(root / relative)
    os.symlink(root, root / "a" / "b" / "up")
    os.symlink(root / "a", root / "c" / "to_a")
    os.symlink(root / "nowhere.png", root / "a" / "dangling.png")
    os.symlink(root / "a" / "self.png", root / "a" / "self.png")
    os.symlink(root / "a" / "x.png", root / "same.png")
    return root


def test_recursive_glob_does_not_follow_symlink_loops(linked_tree):
    # issue 17 item 11: `**` followed the loop (19 files became 779 items) and dropped bad links uncounted
    search = find_images(str(linked_tree / "**" / "*.png"))
    assert [path.relative_to(linked_tree).as_posix() for path in search.files] == ["a/b/y.png", "a/x.png", "top.png"]
    reasons = {name.replace(str(linked_tree) + os.sep, ""): reason for name, reason in search.skipped.items()}
    assert reasons["a/dangling.png"] == "dangling symbolic link"
    assert reasons["a/self.png"].startswith("symbolic link loop")
    assert reasons["a/b/up"].startswith("symbolic link loop")
    assert reasons["same.png"] == f"same file as {linked_tree / 'a' / 'x.png'}"
    folder = find_images(linked_tree / "a")  # a folder: its own files, bad links counted too
    assert [path.name for path in folder.files] == ["x.png"]
    assert sorted(os.path.basename(name) for name in folder.skipped) == ["dangling.png", "self.png"]


def test_calibrate_counts_skipped_links(linked_tree):
    items, skipped = find_calibration_images(str(linked_tree / "**" / "*.png"))
    assert len(items) == 3 and len(skipped) >= 4
    with pytest.raises(ValueError, match=r"skipped: .*dangling symbolic link"):
        find_calibration_images(str(linked_tree / "a" / "dangling.png"))


def test_calibrate_cli_reports_skipped_links(linked_tree, tmp_path, tmp_path_factory, capsys):
    from test_eval_runner import tiny_model_dir

    out = tmp_path / "map"
    code = main(
        [
            "calibrate",
            "--model",
            str(tiny_model_dir(tmp_path_factory)),
            "--images",
            str(linked_tree / "**" / "*.png"),
            "--out",
            str(out),
            "--no-cache",
            "--no-plots",
            "--quiet",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "profiled 3 images" in printed
    skipped = int(printed.split("skipped ")[1].split(",")[0])
    assert skipped >= 4
    assert "dangling symbolic link" in printed and "symbolic link loop" in printed
