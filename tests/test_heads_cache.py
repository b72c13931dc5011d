"""A calibrated map never silently replaces a tuned one: calibration caches beside the tuned map, wrap prefers the
tuned map (cache, then shipped) and says so, an explicit head_map chooses; calibrate warns below the minimum image
count."""

import dataclasses
import logging

import numpy as np
import pytest
from PIL import Image

import vlm_guard
import vlm_guard.calibration.head_map as head_map_module
from vlm_guard.calibration import HeadMap
from vlm_guard.calibration.calibrate import MIN_CALIBRATION_IMAGES, HeadProfiler
from vlm_guard.calibration.head_map import (
    cache_folder,
    cache_report,
    calibrated_cache_folder,
    find_cached_head_map,
    find_head_map,
    save_to_cache,
)
from vlm_guard.models import get_adapter
from vlm_guard.testing import build_batch, tiny_model

TUNED = {"settings": {"pai": {"alpha": 0.3}}, "default_methods": ["pai"], "tuning_data": {"name": "tuning set"}}


@pytest.fixture(scope="module")
def model():
    built = tiny_model("llava")
    built.config._name_or_path = "org/tiny-llava"
    return built


@pytest.fixture(scope="module")
def calibrated(model):
    with HeadProfiler.open(model) as profiler:
        profiler.profile(build_batch(model, [(True, 5), (True, 8)]))
        return profiler.head_map({"prompts": ["describe"], "n_skipped": 0})


@pytest.fixture
def tuned(calibrated):
    return dataclasses.replace(calibrated, gift_enhance_layers=[1], tuned=dict(TUNED))


@pytest.fixture(autouse=True)
def _private_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_GUARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("vlm_guard.tuning.shipped.SHIPPED_HEAD_MAPS", tmp_path / "shipped")
    monkeypatch.setattr(head_map_module, "_REPORTED", set())


def _wrapped_map(model):
    guarded = vlm_guard.wrap(model)
    try:
        return guarded.head_map
    finally:
        guarded.unwrap()


def test_calibration_does_not_replace_the_tuned_map_in_the_cache(model, calibrated, tuned):
    tuned_folder = tuned.save_pretrained(cache_folder(tuned.fingerprint))  # what `vlm-guard tune` writes
    saved = save_to_cache(calibrated)  # what `vlm-guard calibrate` writes afterwards
    assert saved == calibrated_cache_folder(calibrated.fingerprint) != tuned_folder
    assert HeadMap.from_pretrained(tuned_folder) == tuned  # both kept
    assert HeadMap.from_pretrained(saved) == calibrated
    assert find_cached_head_map(get_adapter(model)) == tuned
    assert _wrapped_map(model) == tuned  # wrap prefers the tuned map
    lines = cache_report(calibrated)
    assert lines[0] == f"cached at {saved}"
    assert "keeps using the tuned head map" in lines[1] and f"--head-map {saved}" in lines[1]


def test_a_shipped_tuned_map_wins_over_a_calibrated_one_with_a_warning(model, calibrated, tuned, tmp_path, caplog):
    from vlm_guard.tuning.shipped import shipped_folder

    tuned.save_pretrained(shipped_folder(tuned.fingerprint))
    saved = save_to_cache(calibrated)
    with caplog.at_level(logging.WARNING, logger="vlm_guard.calibration.head_map"):
        assert _wrapped_map(model) == tuned
        assert _wrapped_map(model) == tuned
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per process, not on every wrap
    assert str(saved) in warnings[0] and "head_map=" in warnings[0] and "--head-map" in warnings[0]
    assert "shipped tuned head map" in cache_report(calibrated)[1]
    # choosing the calibrated map: pass it
    guarded = vlm_guard.wrap(model, head_map=saved)
    try:
        assert guarded.head_map == calibrated
    finally:
        guarded.unwrap()


def test_without_a_tuned_map_wrap_uses_the_calibrated_one(model, calibrated):
    saved = save_to_cache(calibrated)
    assert _wrapped_map(model) == calibrated
    assert "will use it" in cache_report(calibrated)[1]
    assert find_head_map(get_adapter(model)) == calibrated
    assert saved.name.endswith("-calibrated")


def test_a_tuned_map_goes_to_the_tuned_folder(tuned):
    assert save_to_cache(tuned) == cache_folder(tuned.fingerprint)


def _toy():
    from vlm_guard.synthetic.model import ToyModelSpec, build_model, build_processor

    spec = ToyModelSpec(
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
    processor = build_processor(spec)
    return build_model(spec, processor.tokenizer).eval(), processor


def _images(count):
    rng = np.random.default_rng(2)
    return [Image.fromarray(rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.mark.parametrize("count,warned", [(3, True), (MIN_CALIBRATION_IMAGES, False)])
def test_calibrate_warns_below_the_minimum_image_count(count, warned, caplog):
    model, processor = _toy()
    with caplog.at_level(logging.WARNING, logger="vlm_guard.calibration.calibrate"):
        head_map = vlm_guard.calibrate(
            model, processor, _images(count), "describe the image", batch_size=8, progress=False, save_cache=False
        )
    assert head_map.calibration["n_images"] == count
    messages = [r.getMessage() for r in caplog.records if "calibrating on" in r.getMessage()]
    assert bool(messages) is warned
    if warned:
        assert f"calibrating on {count} images" in messages[0] and str(MIN_CALIBRATION_IMAGES) in messages[0]


def test_a_near_tie_for_the_gift_layer_is_reported(calibrated):
    from vlm_guard.calibration.calibrate import gift_layer_tie

    layers = calibrated.num_layers
    shifts = [float("nan")] + [1.0] * (layers - 2) + [float("nan")]
    tied = dataclasses.replace(calibrated, gift_saliency_layer=1, gift_layer_shift=[*shifts[:1], 2.56, *shifts[2:]])
    tied.gift_layer_shift[2] = 2.49  # the default model's layers 23 and 1: 3 % apart
    assert gift_layer_tie(tied) == (1, 2.56, 2, 2.49)
    clear = dataclasses.replace(tied, gift_layer_shift=[*shifts[:1], 2.56, 1.5, *shifts[3:]])
    assert gift_layer_tie(clear) is None
    assert gift_layer_tie(dataclasses.replace(tied, gift_saliency_layer=None)) is None


def test_calibrate_help_states_the_minimum_and_the_cache_rule(capsys):
    from vlm_guard.cli import main

    try:
        code = main(["calibrate", "--help"])
    except SystemExit as exit_:  # argparse's own exit
        code = exit_.code
    assert code in (0, None)
    text = " ".join(capsys.readouterr().out.split())
    assert f"Use at least {MIN_CALIBRATION_IMAGES} images" in text and "never over, a tuned map" in text
