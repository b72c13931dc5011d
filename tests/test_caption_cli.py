"""`vlm-guard caption` on the shipped default model: the README's main job."""

import pytest

from vlm_guard.cli import main
from vlm_guard.defaults import DEFAULT_MODEL_DIR, EXAMPLES_DIR

pytestmark = pytest.mark.skipif(
    not (DEFAULT_MODEL_DIR / "config.json").exists(), reason="the default model is not shipped"
)


def test_caption_prints_plain_and_guarded_with_flags(capsys):
    image = sorted(EXAMPLES_DIR.glob("*.png"))[0]
    code = main(["caption", str(image), "--methods", "vhr,gift", "--max-new-tokens", "12", "--check"])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    assert any(line.startswith("plain ") for line in lines)
    assert any(line.startswith("guarded (vhr,gift)") for line in lines)
    assert sum(line.startswith("flagged in ") for line in lines) == 2


def test_caption_without_image_uses_a_bundled_example(capsys):
    assert main(["caption", "--methods", "none", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "(bundled example)" in out and "guarded (none)" in out


def test_caption_bad_inputs_give_clear_errors(tmp_path, capsys):
    assert main(["caption", str(tmp_path / "missing.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert main(["caption", str(corrupt)]) == 2
    err = capsys.readouterr().err
    assert "corrupt.png is not a readable image" in err and "could not read" not in err and len(err.splitlines()) == 1
    assert main(["caption", "--methods", "magic"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["caption", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens: 0 is out of range" in capsys.readouterr().err


def test_check_works_for_a_bundled_example_given_by_path(tmp_path, capsys):
    """`caption FILE --check` counts against the ground truth when FILE is a bundled example (also a copy of one)."""
    import shutil

    image = sorted(EXAMPLES_DIR.glob("*.png"))[0]
    copy = tmp_path / "copy.png"
    shutil.copyfile(image, copy)
    for path in (image, copy):
        assert main(["caption", str(path), "--methods", "none", "--max-new-tokens", "6", "--check"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert any(line.startswith("not in the scene (plain): ") for line in lines), lines
        assert any(line.startswith("not in the scene (guarded") for line in lines), lines
        assert "what changed: nothing (the guarded caption is the plain one)" in lines, lines


def test_what_changed_names_the_objects_the_guard_dropped_and_added():
    from vlm_guard.cli.caption import what_changed
    from vlm_guard.eval.synthetic import score_synthetic_caption

    truth = {"fork", "cup"}
    plain = score_synthetic_caption("A fork and a knife. A cup.", truth, "everyday")
    guarded = score_synthetic_caption("A fork. A cup and a saucer.", truth, "everyday")
    line = what_changed("A fork and a knife. A cup.", "A fork. A cup and a saucer.", plain, guarded)
    assert (
        line == "what changed: objects not in the scene dropped: knife; added: saucer; scene objects named 2/2 -> 2/2"
    )
    assert what_changed("a b", "a c", None, None).startswith("what changed: the wording (no ground truth")


def test_check_says_so_when_an_image_cannot_be_checked(tmp_path, capsys, monkeypatch):
    """No ground truth and no checker for the model's world: one line says so (it printed nothing)."""
    from PIL import Image

    import vlm_guard.cli.caption as caption

    monkeypatch.setattr(caption, "_checker", lambda args, world="shapes": None)
    path = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(path)
    assert main(["caption", str(path), "--methods", "none", "--max-new-tokens", "4", "--check"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(
        line.startswith("not checked: photo.png is not a bundled example") and "--checker" in line for line in lines
    ), lines


def test_caption_runs_the_caption_profile_and_prints_its_held_out_effect(tmp_path, capsys):
    """`caption` with a map of task profiles runs the caption profile, says so, and prints the held-out line read
    from held_out.json beside the map (only when the settings that ran are the ones measured)."""
    import json

    import vlm_guard

    model, processor = vlm_guard.load_default()
    shipped = vlm_guard.wrap(model, processor).head_map
    import copy

    mapped = copy.copy(shipped)
    mapped.tuned = {
        "format": "profiles",
        "default_profile": "caption",
        "tuning_data": {"name": "test data"},
        "profiles": {
            "caption": {"settings": {"pai": {"alpha": 0.3, "gamma": 1.0}}, "default_methods": ["pai"]},
            "answer": {"settings": {}, "default_methods": []},
        },
    }
    folder = tmp_path / "map"
    mapped.save_pretrained(folder)
    line = "held-out effect of the caption profile (pai alpha=0.3 gamma=1.0): CHAIR_I 26.1 -> 22.8 (-3.3 [-4.9, -1.6])"
    (folder / "held_out.json").write_text(
        json.dumps(
            {
                "source": "test",
                "profiles": {"caption": {"settings": {"pai": {"alpha": 0.3, "gamma": 1.0}}, "line": line}},
            }
        )
    )
    assert main(["caption", "--head-map", str(folder), "--max-new-tokens", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line_.startswith("methods: pai (caption profile, chosen by `vlm-guard tune`") for line_ in lines), lines
    assert any(line_.startswith("settings profile: caption (task 'caption'") for line_ in lines), lines
    assert any(line_.startswith("guarded (pai)") for line_ in lines) and lines[-1] == line
    assert main(["caption", "--head-map", str(folder), "--max-new-tokens", "4", "--methods", "auto:answer"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line_.startswith("guarded (none)") for line_ in lines)
    assert main(["caption", "--head-map", str(folder), "--methods", "auto:vqa"]) == 2
    assert "unknown task 'vqa'" in capsys.readouterr().err


@pytest.mark.parametrize(("world", "max_objects"), [("everyday", 3), ("everyday_v3", 4)])
def test_bundled_everyday_examples_follow_the_written_rule(world, max_objects):
    """The shipped everyday examples (v2's, and v3's: scenes of up to 4 objects) are what select_examples picks from
    their recorded plain captions: traps where plain names an absent partner, one scene where plain is right; never
    chosen by a guarded caption."""
    import json

    from vlm_guard.defaults import EXAMPLES_DIRS
    from vlm_guard.synthetic.examples import select_examples

    folder = EXAMPLES_DIRS[world]
    entries = json.loads((folder / "examples.json").read_text())
    assert {entry["kind"] for entry in entries} == {"trap", "right"}
    assert sum(entry["kind"] == "right" for entry in entries) == 1
    for entry in entries:
        assert (folder / entry["file"]).is_file() and entry["world_seed"] == 910001
        assert "guarded" not in json.dumps(entry).replace("never a guarded", "")
        named = set(entry["plain_hallucinated_at_selection"])
        assert (named & set(entry["absent_partners"])) if entry["kind"] == "trap" else not named
    records = [
        {
            "index": e["scene_index"],
            "types": e["types"],
            "absent_partners": e["absent_partners"],
            "hallucinated": e["plain_hallucinated_at_selection"],
            "recalled": e["types"] if e["kind"] == "right" else [],
        }
        for e in sorted(entries, key=lambda e: e["scene_index"])
    ]
    chosen = select_examples(records, max_objects=max_objects)
    assert [r["index"] for r in chosen] == [e["scene_index"] for e in entries]
