"""HeadMap: save / load / compare, fingerprint checks, clear errors for corrupt files, the cache."""

import dataclasses
import json
import logging

import pytest
import torch

import vlm_guard
from vlm_guard.heads import HeadMap, HeadMapFileError, HeadMapMismatchError, find_cached_head_map
from vlm_guard.heads.calibrate import HeadProfiler
from vlm_guard.heads.head_map import JSON_FILE, TENSOR_FILE, cache_folder, default_cache_dir, save_to_cache
from vlm_guard.models import get_adapter
from vlm_guard.testing import build_batch, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llava")


@pytest.fixture(scope="module")
def head_map(model):
    with HeadProfiler.open(model) as profiler:
        profiler.profile(build_batch(model, [(True, 5), (True, 8)]))
        return profiler.head_map({"prompts": ["describe"], "n_skipped": 0})


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_GUARD_CACHE", str(tmp_path / "cache"))


def test_round_trip(head_map, tmp_path):
    head_map.save_pretrained(tmp_path / "map")
    assert sorted(p.name for p in (tmp_path / "map").iterdir()) == [JSON_FILE, TENSOR_FILE]
    loaded = HeadMap.from_pretrained(tmp_path / "map")
    assert loaded == head_map
    assert loaded.summary() == head_map.summary()
    masks = loaded.vhr_head_masks()
    assert sorted(masks) == [0, 1, 2, 3] and all(m.dtype == torch.bool and m.shape == (4,) for m in masks.values())
    data = json.loads((tmp_path / "map" / JSON_FILE).read_text())
    assert data["library_version"] == vlm_guard.__version__
    assert data["fingerprint"]["num_heads"] == 4 and data["calibration"]["n_images"] == 2
    changed = HeadMap.from_pretrained(tmp_path / "map")
    changed.vhd_mean[0, 0] += 1.0
    assert changed != head_map


def test_summary_is_a_table(head_map):
    text = head_map.summary()
    assert "layer" in text and "VHD mean" in text and "sink dims" in text
    assert len([line for line in text.splitlines() if line.strip()[:1].isdigit()]) == 4


def test_other_fingerprint_is_refused(head_map):
    other = tiny_model("llava", text_overrides={"num_hidden_layers": 3})
    with pytest.raises(HeadMapMismatchError) as error:
        head_map.check_compatible(get_adapter(other))
    message = str(error.value)
    assert "num_layers=4" in message and "num_layers=3" in message and "vlm-guard calibrate" in message
    with pytest.raises(HeadMapMismatchError):
        vlm_guard.wrap(other, head_map=head_map)
    assert isinstance(error.value, ValueError)


def test_names_compare_by_last_path_component(head_map, model):
    named = dataclasses.replace(head_map, fingerprint=dict(head_map.fingerprint, name_or_path="llava-hf/tiny"))
    model.config._name_or_path = "/models/tiny"
    try:
        named.check_compatible(get_adapter(model))  # hub id vs local copy of the same checkpoint
        model.config._name_or_path = "llava-hf/other"
        with pytest.raises(HeadMapMismatchError, match="name_or_path"):
            named.check_compatible(get_adapter(model))
    finally:
        model.config._name_or_path = ""


def test_corrupt_files_give_clear_errors(head_map, tmp_path):
    folder = head_map.save_pretrained(tmp_path / "map")
    (folder / TENSOR_FILE).write_bytes(b"\x00garbage, not safetensors")
    with pytest.raises(HeadMapFileError, match=TENSOR_FILE):
        HeadMap.from_pretrained(folder)
    head_map.save_pretrained(folder)
    (folder / JSON_FILE).write_text('{"format": "vlm_guard.head_map", "fingerprint": ')
    with pytest.raises(HeadMapFileError, match=JSON_FILE):
        HeadMap.from_pretrained(folder)
    head_map.save_pretrained(folder)
    data = json.loads((folder / JSON_FILE).read_text())
    del data["sinks"]
    (folder / JSON_FILE).write_text(json.dumps(data))
    with pytest.raises(HeadMapFileError, match="missing field 'sinks'"):
        HeadMap.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        HeadMap.from_pretrained(tmp_path / "nowhere")


def test_cache_lookup(head_map, model, tmp_path, caplog):
    assert default_cache_dir() == tmp_path / "cache"
    adapter = get_adapter(model)
    assert save_to_cache(head_map) is None  # an unnamed model is never cached
    assert find_cached_head_map(adapter) is None
    model.config._name_or_path = "org/tiny-llava"
    try:
        named = dataclasses.replace(head_map, fingerprint=get_adapter(model).describe())
        folder = save_to_cache(named)
        assert folder == cache_folder(named.fingerprint) and folder.parent == tmp_path / "cache"
        assert find_cached_head_map(get_adapter(model)) == named
        guarded = vlm_guard.wrap(model)
        try:
            assert guarded.head_map == named
        finally:
            guarded.unwrap()
        (folder / TENSOR_FILE).write_bytes(b"broken")
        with caplog.at_level(logging.WARNING):
            assert find_cached_head_map(get_adapter(model)) is None
        assert TENSOR_FILE in caplog.text
    finally:
        model.config._name_or_path = ""


def test_vhr_runs_from_the_head_map(head_map, model):
    from vlm_guard.decoding.vhr import VHRConfig

    inputs = build_batch(model, [(True, 5), (True, 8)])
    guarded = vlm_guard.wrap(model, config=vlm_guard.GuardConfig(vhr=VHRConfig(selection="head_map")), head_map=head_map)
    try:
        output = guarded.generate(**inputs, max_new_tokens=3, do_sample=False)
        with guarded.disabled():
            plain = guarded.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        guarded.unwrap()
    assert output.shape == plain.shape


def test_override_sink_dims(head_map):
    copy = dataclasses.replace(head_map, sink_dims=[], sink_dim_ratios=[])
    copy.override_sink_dims([3, 9])
    assert copy.sink_dims == [3, 9] and copy.sink_dims_source == "override" and len(copy.sink_dim_ratios) == 2
    with pytest.raises(ValueError, match="outside"):
        copy.override_sink_dims([64])
