"""`vlm-guard calibrate` end to end on a tiny LLaVA saved to disk, with a corrupt image in the folder;
`vlm-guard heads show`."""

import json

import numpy as np
import pytest
from PIL import Image

from vlm_guard.calibration import HeadMap
from vlm_guard.calibration.plots import SINK_PLOT, VHD_PLOT
from vlm_guard.cli import main
from vlm_guard.synthetic.model import ToyModelSpec, build_model, build_processor

SPEC = ToyModelSpec(
    image_size=32,
    patch_size=8,
    vision_hidden=32,
    vision_layers=1,
    vision_heads=2,
    text_hidden=64,
    text_layers=4,
    text_heads=4,
    text_intermediate=128,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    processor = build_processor(SPEC)
    build_model(SPEC, processor.tokenizer).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        pixels = rng.integers(0, 255, size=(40 + index * 8, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"image_{index}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    return folder


def test_calibrate_end_to_end(model_dir, image_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLM_GUARD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "map"
    code = main(
        [
            "calibrate",
            "--model",
            str(model_dir),
            "--images",
            str(image_dir),
            "--out",
            str(out),
            "--batch-size",
            "2",
            "--prompt",
            "describe the image",
            "--quiet",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "profiled 3 images, skipped 1" in printed and "broken.png" in printed
    assert {p.name for p in out.iterdir()} >= {"head_map.json", "head_map.safetensors", VHD_PLOT, SINK_PLOT}
    assert Image.open(out / VHD_PLOT).format == "PNG" and Image.open(out / SINK_PLOT).format == "PNG"
    data = json.loads((out / "head_map.json").read_text())
    assert data["calibration"]["n_images"] == 3 and data["calibration"]["n_skipped"] == 1
    assert data["calibration"]["prompts"] == ["describe the image"]
    head_map = HeadMap.from_pretrained(out)
    assert head_map.fingerprint["num_layers"] == 4 and head_map.fingerprint["name_or_path"].endswith(model_dir.name)
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and HeadMap.from_pretrained(cached[0]) == head_map

    assert main(["heads", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    summary = head_map.summary().strip().replace(head_map.fingerprint["name_or_path"], model_dir.name)
    assert shown.strip().startswith(summary)  # the model by name, not the absolute folder it was calibrated from
    assert str(model_dir) not in shown
    assert "tuned settings: none" in shown  # then the tuned settings (vlm-guard tune), here none


def test_calibrate_limit_and_errors(model_dir, image_dir, tmp_path, capsys):
    out = tmp_path / "map"
    assert (
        main(
            [
                "calibrate",
                "--model",
                str(model_dir),
                "--images",
                str(image_dir / "image_*.png"),
                "--out",
                str(out),
                "--limit",
                "1",
                "--no-cache",
                "--no-plots",
                "--quiet",
            ]
        )
        == 0
    )
    assert "profiled 1 images, skipped 0" in capsys.readouterr().out
    assert not (out / VHD_PLOT).exists()
    assert (
        main(
            [
                "calibrate",
                "--model",
                str(model_dir),
                "--images",
                str(tmp_path / "none*.png"),
                "--out",
                str(out),
                "--no-cache",
            ]
        )
        == 2
    )
    assert "neither a folder" in capsys.readouterr().err
    assert main(["heads", "show", str(tmp_path / "missing")]) == 2
    assert "head_map.json" in capsys.readouterr().err


class _PickyProcessor:
    """The real processor, except that it rejects 13-pixel-wide images (as a processor may reject odd inputs)."""

    def __init__(self, processor):
        self._processor = processor

    def __getattr__(self, name):
        return getattr(self._processor, name)

    def __call__(self, images=None, **kwargs):
        flat = [image for row in images for image in (row if isinstance(row, list) else [row])]  # one list per prompt
        if any(image.width == 13 for image in flat):
            raise ValueError("unsupported image width 13")
        return self._processor(images=images, **kwargs)


def test_an_image_the_processor_rejects_is_skipped_not_fatal():
    import vlm_guard

    processor = build_processor(SPEC)
    model = build_model(SPEC, processor.tokenizer).eval()
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, size=(20, width, 3), dtype=np.uint8)) for width in (24, 13, 30, 32)]
    head_map = vlm_guard.calibrate(
        model, _PickyProcessor(processor), images, "describe the image", batch_size=4, progress=False, save_cache=False
    )
    assert head_map.calibration["n_images"] == 3 and head_map.calibration["n_skipped"] == 1
    assert "image #1" in head_map.calibration["skipped"][0] and "width 13" in head_map.calibration["skipped"][0]
