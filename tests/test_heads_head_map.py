"""HeadMap: save / load / compare, fingerprint checks, clear errors for corrupt files, the cache."""

import dataclasses
import json
import logging

import pytest
import torch

import vlm_guard
from vlm_guard.calibration import HeadMap, HeadMapFileError, HeadMapMismatchError, find_cached_head_map
from vlm_guard.calibration.calibrate import HeadProfiler
from vlm_guard.calibration.head_map import (
    JSON_FILE,
    TENSOR_FILE,
    cache_folder,
    calibrated_cache_folder,
    default_cache_dir,
    save_to_cache,
)
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


def test_identity_is_the_weights_not_the_name(head_map, model):
    # an unnamed map of the same shape made for another model (other weights) is refused
    other = tiny_model("llava", seed=1)
    with pytest.raises(HeadMapMismatchError, match="weights_digest"):
        head_map.check_compatible(get_adapter(other))
    with pytest.raises(HeadMapMismatchError):
        vlm_guard.wrap(other, head_map=head_map)
    # the same weights under another name are the same model
    named = dataclasses.replace(head_map, fingerprint=dict(head_map.fingerprint, name_or_path="llava-hf/tiny"))
    model.config._name_or_path = "/models/other-name"
    try:
        named.check_compatible(get_adapter(model))
    finally:
        model.config._name_or_path = ""


def test_same_folder_name_other_run_does_not_share_the_cache(head_map, model):
    run_a, run_b = model, tiny_model("llava", seed=1)
    run_a.config._name_or_path, run_b.config._name_or_path = "runA/checkpoint-final", "runB/checkpoint-final"
    try:
        with HeadProfiler.open(run_a) as profiler:
            profiler.profile(build_batch(run_a, [(True, 5)]))
            map_a = profiler.head_map({"prompts": ["describe"], "n_skipped": 0})
        folder = save_to_cache(map_a)
        assert folder is not None and folder.name.startswith("checkpoint-final-")
        assert find_cached_head_map(get_adapter(run_a)) == map_a
        assert find_cached_head_map(get_adapter(run_b)) is None
        assert cache_folder(get_adapter(run_b).describe()) != folder
    finally:
        run_a.config._name_or_path = run_b.config._name_or_path = ""


@pytest.mark.parametrize("lost", ["weights_digest", "config_digest", "num_kv_heads", "family", "model_class"])
def test_map_that_lost_its_identity_fields_is_refused(head_map, model, lost):
    fingerprint = dict(head_map.fingerprint)
    del fingerprint[lost]
    with pytest.raises(HeadMapMismatchError, match=f"lacks the identity fields.*{lost}"):
        dataclasses.replace(head_map, fingerprint=fingerprint).check_compatible(get_adapter(model))


def test_version_1_map_without_digests_is_refused(head_map, model, tmp_path):
    folder = head_map.save_pretrained(tmp_path / "map")
    data = json.loads((folder / JSON_FILE).read_text())
    data["format_version"] = 1
    for key in ("config_digest", "weights_digest", "weights_dtype", "transformers_version"):
        del data["fingerprint"][key]
    (folder / JSON_FILE).write_text(json.dumps(data))
    old = HeadMap.from_pretrained(folder)  # still readable (e.g. by `vlm-guard heads show`)
    with pytest.raises(HeadMapMismatchError, match="lacks the identity fields"):
        vlm_guard.wrap(model, head_map=old)


def test_map_made_in_float32_serves_float16_and_bfloat16_copies(head_map):
    for dtype in (torch.float16, torch.bfloat16):
        copy = tiny_model("llava", dtype=torch.float32).to(dtype)
        head_map.check_compatible(get_adapter(copy))
    other = tiny_model("llava", seed=1).to(torch.float16)
    with pytest.raises(HeadMapMismatchError, match="weights_digest"):
        head_map.check_compatible(get_adapter(other))


def _edit_json(folder, change):
    data = json.loads((folder / JSON_FILE).read_text())
    change(data)
    (folder / JSON_FILE).write_text(json.dumps(data))


def _rebind_digest(folder):
    """Record the tensors file's new digest in the JSON (a hand-edited tensors file the JSON vouches for)."""
    from vlm_guard.fileio import sha256_file

    _edit_json(folder, lambda data: data.__setitem__("tensors_sha256", sha256_file(folder / TENSOR_FILE)))


@pytest.mark.parametrize(
    "vhr_heads", [{"-1": [0]}, {"0": [-1]}, {"4": [0]}, {"0": [4]}, {"0": [1.5]}, {"x": [0]}, {"0": 3}]
)
def test_bad_layer_or_head_indices_are_refused(head_map, tmp_path, vhr_heads):
    folder = head_map.save_pretrained(tmp_path / "map")
    _edit_json(folder, lambda data: data["vhd"].__setitem__("vhr_heads", vhr_heads))
    with pytest.raises(HeadMapFileError, match="vhr_heads"):
        HeadMap.from_pretrained(folder)


@pytest.mark.parametrize("version", [None, "2", True, 0, -1, 2.0])
def test_bad_format_version_is_a_clear_error(head_map, tmp_path, version):
    folder = head_map.save_pretrained(tmp_path / "map")
    _edit_json(folder, lambda data: data.__setitem__("format_version", version))
    with pytest.raises(HeadMapFileError, match="format_version"):
        HeadMap.from_pretrained(folder)


def test_deeply_nested_json_is_a_clear_error(head_map, tmp_path):
    folder = head_map.save_pretrained(tmp_path / "map")
    depth = 100_000
    text = (folder / JSON_FILE).read_text().rstrip().rstrip("}") + ', "deep": ' + "[" * depth + "]" * depth + "}"
    (folder / JSON_FILE).write_text(text)
    with pytest.raises(HeadMapFileError, match="nested too deeply"):
        HeadMap.from_pretrained(folder)
    head_map.save_pretrained(folder)
    _edit_json(folder, lambda data: data.__setitem__("calibration", {"n_images": 1e400}))  # JSON Infinity
    HeadMap.from_pretrained(folder)  # calibration is free-form metadata
    _edit_json(folder, lambda data: data["gift"].__setitem__("saliency_layer", 1e400))
    with pytest.raises(HeadMapFileError):
        HeadMap.from_pretrained(folder)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8, torch.complex64])
def test_odd_tensor_dtypes_are_a_clear_error(head_map, tmp_path, dtype):
    from safetensors.torch import load_file, save_file

    folder = head_map.save_pretrained(tmp_path / "map")
    tensors = load_file(str(folder / TENSOR_FILE))
    tensors["vhd_mean"] = torch.ones(4, 4).to(dtype)
    try:
        save_file(tensors, str(folder / TENSOR_FILE))
    except Exception:  # safetensors cannot store this dtype at all
        pytest.skip(f"safetensors does not store {dtype}")
    _rebind_digest(folder)
    with pytest.raises(HeadMapFileError, match="vhd_mean.*dtype"):
        HeadMap.from_pretrained(folder)


def test_half_precision_tensors_are_read_as_float32(head_map, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = head_map.save_pretrained(tmp_path / "map")
    tensors = {name: tensor.half() for name, tensor in load_file(str(folder / TENSOR_FILE)).items()}
    save_file(tensors, str(folder / TENSOR_FILE))
    _rebind_digest(folder)
    assert HeadMap.from_pretrained(folder).vhd_mean.dtype == torch.float32


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
    with pytest.raises(HeadMapFileError, match=f"{JSON_FILE}: field sinks is missing"):
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
        assert (
            folder == calibrated_cache_folder(named.fingerprint) and folder.parent == tmp_path / "cache"
        )  # untuned: beside a tuned map
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
    from vlm_guard.methods.vhr.intervention import VHRConfig

    inputs = build_batch(model, [(True, 5), (True, 8)])
    guarded = vlm_guard.wrap(
        model, config=vlm_guard.GuardConfig(vhr=VHRConfig(selection="head_map")), head_map=head_map
    )
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


def test_cache_folder_is_the_same_under_every_transformers_version():
    # transformers 4.57 and 5.x serialise the same config differently (other config digest): the map calibrated
    # under one must be found under the other; other weights or geometry still get another folder
    from vlm_guard.calibration.head_map import cache_folder

    fingerprint = {
        "family": "llava",
        "model_class": "LlavaForConditionalGeneration",
        "num_layers": 6,
        "num_heads": 6,
        "num_kv_heads": 6,
        "head_dim": 32,
        "hidden_size": 192,
        "name_or_path": "default_model",
        "config_digest": "aaaa",
        "weights_digest": "bbbb",
        "transformers_version": "5.24.0",
    }
    other_version = dict(fingerprint, config_digest="cccc", transformers_version="4.57.6")
    assert cache_folder(fingerprint, "/c") == cache_folder(other_version, "/c")
    assert cache_folder(dict(fingerprint, weights_digest="dddd"), "/c") != cache_folder(fingerprint, "/c")
    assert cache_folder(dict(fingerprint, num_layers=7), "/c") != cache_folder(fingerprint, "/c")
