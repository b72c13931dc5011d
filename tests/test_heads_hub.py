"""Head maps shared like peft adapters: HeadMap.from_pretrained("org/name") from a local hub cache layout (offline),
push_to_hub with a model card (HfApi monkeypatched to write into a folder: no network)."""

import dataclasses
import shutil
from pathlib import Path

import pytest

import vlm_guard.calibration.hub as hub
from vlm_guard.calibration import HeadMap
from vlm_guard.calibration.calibrate import MIN_CALIBRATION_IMAGES, HeadProfiler
from vlm_guard.calibration.head_map import JSON_FILE, TENSOR_FILE
from vlm_guard.testing import build_batch, tiny_model

REVISION = "0123456789abcdef0123456789abcdef01234567"
TUNED = {
    "settings": {"var": {"p": 0.2, "rho": 0.5}},
    "default_methods": ["var"],
    "tuning_data": {"name": "synthetic everyday world seed 910001 (tuning)"},
    "objective": {"text": "minimise CHAIR_I + adversarial POPE error (%)"},
    "gain": {"var": "yes: score 40.1 vs greedy 46.1 on the confirmation rung"},
    "default_row": {
        "label": "var p=0.2",
        "score": 40.1,
        "greedy_score": 46.1,
        "n": {"chair": 300},
        "metrics": {"chair": {"chair_i": 20.5, "recall": 80.0, "n": 300}},
    },
}


@pytest.fixture(scope="module")
def head_map():
    model = tiny_model("llava")
    with HeadProfiler.open(model) as profiler:
        profiler.profile(build_batch(model, [(True, 5), (True, 8)]))
        made = profiler.head_map({"prompts": ["describe"], "n_skipped": 0})
    fingerprint = dict(made.fingerprint, name_or_path="llava-hf/llava-1.5-7b-hf")
    return dataclasses.replace(made, fingerprint=fingerprint, tuned=TUNED)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty huggingface_hub cache, offline (HF_HUB_CACHE read at call time)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # a relative "org/name" folder must not exist by accident
    return cache


def _publish(head_map, cache: Path, repo_id: str, revision: str = REVISION, ref: str = "main") -> Path:
    """Lay out ``repo_id`` as huggingface_hub's cache does: models--org--name/snapshots/<rev>/ + refs/<ref>."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    head_map.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(revision)
    return snapshot


def test_hub_id_is_read_from_the_local_hub_cache_offline(head_map, hub_cache):
    _publish(head_map, hub_cache, "someone/llava-head-map")
    loaded = HeadMap.from_pretrained("someone/llava-head-map")
    assert loaded == head_map
    assert loaded.tuned["default_methods"] == ["var"]


def test_a_pinned_revision_is_read(head_map, hub_cache):
    other = "f" * 40
    _publish(head_map, hub_cache, "someone/llava-head-map")
    changed = dataclasses.replace(head_map, gift_enhance_layers=[1])
    _publish(changed, hub_cache, "someone/llava-head-map", revision=other, ref="v2")
    assert HeadMap.from_pretrained("someone/llava-head-map") == head_map
    assert HeadMap.from_pretrained("someone/llava-head-map", revision=other).gift_enhance_layers == [1]


def test_a_local_folder_wins_over_a_hub_id_of_the_same_name(head_map, hub_cache, tmp_path):
    _publish(head_map, hub_cache, "maps/llava")
    local = dataclasses.replace(head_map, gift_enhance_layers=[2])
    local.save_pretrained(tmp_path / "maps" / "llava")
    assert HeadMap.from_pretrained("maps/llava").gift_enhance_layers == [2]


def test_a_hub_id_missing_offline_is_one_clear_error(hub_cache):
    with pytest.raises(FileNotFoundError) as error:
        HeadMap.from_pretrained("someone/not-there")
    message = str(error.value)
    assert "someone/not-there" in message and "HF_HUB_OFFLINE" in message and "\n" not in message
    # a path that is not a hub id keeps the folder error
    with pytest.raises(FileNotFoundError, match="vlm-guard calibrate --out"):
        HeadMap.from_pretrained("./not/a/folder")


def test_a_hub_repository_without_a_head_map_is_refused(head_map, hub_cache):
    snapshot = _publish(head_map, hub_cache, "someone/a-model")
    (snapshot / TENSOR_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"holds no head map: {TENSOR_FILE} missing"):
        HeadMap.from_pretrained("someone/a-model")


@pytest.mark.parametrize(
    "name,expected",
    [
        ("org/name", True),
        ("llava-hf/llava-1.5-7b-hf", True),
        ("name", False),
        ("./org/name", False),
        ("/abs/path", False),
        ("a/b/c", False),
        ("org/..", False),
        ("~/maps", False),
    ],
)
def test_is_hub_id(name, expected):
    assert hub.is_hub_id(name) is expected


class _FakeApi:
    """HfApi stand-in: create_repo records, upload_folder copies into a folder (no network)."""

    uploads: Path
    calls: list

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, repo_type=None, private=None, exist_ok=False, **kwargs):
        _FakeApi.calls.append(("create_repo", repo_id, repo_type, private, exist_ok))

    def upload_folder(
        self,
        repo_id,
        folder_path,
        repo_type=None,
        revision=None,
        commit_message=None,
        create_pr=False,
        allow_patterns=None,
        **kwargs,
    ):
        target = _FakeApi.uploads / repo_id
        shutil.copytree(folder_path, target)
        _FakeApi.calls.append(("upload_folder", repo_id, commit_message, sorted(allow_patterns or [])))
        return {"commit_url": f"https://example.invalid/{repo_id}"}


@pytest.fixture
def fake_api(tmp_path, monkeypatch):
    import huggingface_hub

    _FakeApi.uploads, _FakeApi.calls = tmp_path / "uploads", []
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    return _FakeApi


def test_push_to_hub_uploads_the_map_and_a_model_card(head_map, fake_api, hub_cache):
    info = head_map.push_to_hub("me/llava-head-map", private=True)
    assert info["commit_url"].endswith("me/llava-head-map")
    assert fake_api.calls[0] == ("create_repo", "me/llava-head-map", "model", True, True)
    uploaded = fake_api.uploads / "me/llava-head-map"
    assert sorted(p.name for p in uploaded.iterdir()) == sorted([JSON_FILE, TENSOR_FILE, hub.CARD_FILE])
    assert HeadMap.from_pretrained(uploaded) == head_map
    card = (uploaded / hub.CARD_FILE).read_text()
    assert card.startswith("---\nlibrary_name: vlm-guard\n") and "base_model: llava-hf/llava-1.5-7b-hf" in card
    fp = head_map.fingerprint
    for fact in (
        fp["weights_digest"],
        fp["config_digest"],
        head_map.fingerprint_hash,
        "images: 2 profiled",
        "synthetic everyday world seed 910001",
        "default methods: var",
        "var: p=0.2, rho=0.5",
        "## Measured effect",
        "chair_i 20.5",
        "HeadMap.from_pretrained('me/llava-head-map')",
    ):
        assert fact in card, fact
    assert f"fewer than {MIN_CALIBRATION_IMAGES} images" in card  # 2 images: the card says the map is not stable
    # what was pushed reads back through the hub cache layout
    _publish(HeadMap.from_pretrained(uploaded), hub_cache, "me/llava-head-map")
    assert HeadMap.from_pretrained("me/llava-head-map") == head_map


def test_card_of_an_untuned_map_from_a_local_checkpoint(head_map):
    untuned = dataclasses.replace(
        head_map,
        tuned={},
        fingerprint=dict(head_map.fingerprint, name_or_path="/home/me/ckpt/run-7"),
        calibration=dict(head_map.calibration, n_images=500),
    )
    card = hub.model_card(untuned, "me/run-7-map")
    assert "/home/me" not in card and "run-7" in card and "base_model" not in card  # no machine path in a shared card
    assert "not tuned" in card and "## Measured effect" not in card and "fewer than" not in card


def test_push_to_hub_refuses_a_bad_repo_id(head_map, fake_api):
    with pytest.raises(ValueError, match="'org/name'"):
        head_map.push_to_hub("no-slash")
    assert fake_api.calls == []
