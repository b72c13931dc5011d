"""vlm-guard tune: precedence (config > head map's tuned value > released default), the default method set,
storage in the head map, the objective, and a search that resumes where it stopped."""

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

import vlm_guard
from vlm_guard import GuardConfig
from vlm_guard.calibration import HeadMap
from vlm_guard.calibration.calibrate import HeadProfiler
from vlm_guard.methods.pai.intervention import PAIConfig
from vlm_guard.methods.vhr.intervention import VHRConfig
from vlm_guard.settings import SOURCE_CONFIG, SOURCE_DEFAULT, SOURCE_TUNED, UNTUNED_DEFAULT_METHODS
from vlm_guard.testing import build_batch, tiny_model
from vlm_guard.tuning import default_methods, objective, resolve_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model():
    return tiny_model("llava")


@pytest.fixture(scope="module")
def head_map(model):
    with HeadProfiler.open(model) as profiler:
        profiler.profile(build_batch(model, [(True, 5), (True, 8)]))
        return profiler.head_map({"prompts": ["describe"], "n_skipped": 0})


@pytest.fixture()
def tuned_map(head_map):
    import copy

    tuned = copy.copy(head_map)
    tuned.tuned = {
        "settings": {"vhr": {"alpha": 1.5, "target_layers": [2, 3]}, "pai": {"alpha": 0.4}},
        "default_methods": ["vhr", "pai"],
        "tuning_data": {"name": "test data"},
    }
    return tuned


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_GUARD_CACHE", str(tmp_path / "cache"))


# ---------------------------------------------------------------------------------------------- precedence
def test_unset_fields_take_the_tuned_values(model, tuned_map):
    guarded = vlm_guard.wrap(model, None, GuardConfig.from_methods("vhr"), head_map=tuned_map)
    try:
        assert guarded.guard_config.vhr.alpha == 1.5 and guarded.guard_config.vhr.target_layers == [2, 3]
        assert guarded.settings_sources["vhr"]["alpha"] == SOURCE_TUNED
        assert guarded.settings_sources["vhr"]["selection"] == SOURCE_DEFAULT
        assert guarded.interventions[0].target_layers == [2, 3] and guarded.interventions[0].config.alpha == 1.5
    finally:
        guarded.unwrap()


def test_a_value_set_in_the_config_wins_even_when_it_equals_the_released_default(model, tuned_map):
    # alpha=2.0 is VHR's released default: a rule "tuned unless the value differs from the default" would lose it
    for config in (VHRConfig(alpha=2.0), VHRConfig.from_dict({"alpha": 2.0})):
        resolved, sources = resolve_config(GuardConfig(vhr=config), tuned_map)
        assert resolved.vhr.alpha == 2.0 and sources["vhr"]["alpha"] == SOURCE_CONFIG
        assert resolved.vhr.target_layers == [2, 3] and sources["vhr"]["target_layers"] == SOURCE_TUNED
    assigned = VHRConfig()
    assigned.target_layers = [1]
    resolved, sources = resolve_config(GuardConfig(vhr=assigned), tuned_map)
    assert resolved.vhr.target_layers == [1] and sources["vhr"]["target_layers"] == SOURCE_CONFIG
    assert resolved.vhr.alpha == 1.5 and sources["vhr"]["alpha"] == SOURCE_TUNED


def test_without_tuned_settings_the_released_defaults_run(model, head_map):
    resolved, sources = resolve_config(GuardConfig.from_methods("vhr,pai"), head_map)
    assert resolved.vhr == VHRConfig() and resolved.pai == PAIConfig()
    assert {v for k, v in sources["vhr"].items() if k != "preset"} == {SOURCE_DEFAULT}


def test_a_paper_preset_keeps_its_values_over_tuned_ones(tuned_map):
    tuned_map.tuned = {**tuned_map.tuned, "settings": {"vhr": {"outlier_filter": "off", "alpha": 1.5}}}
    resolved, sources = resolve_config(GuardConfig.from_methods("vhr", preset="paper"), tuned_map)
    assert (
        resolved.vhr.outlier_filter == VHRConfig(preset="paper").outlier_filter
        and sources["vhr"]["outlier_filter"] == SOURCE_CONFIG
    )
    assert resolved.vhr.alpha == 1.5  # not a preset field: tuned
    resolved, _ = resolve_config(GuardConfig.from_methods("vhr"), tuned_map)
    assert resolved.vhr.outlier_filter == "off"
    resolved, _ = resolve_config(GuardConfig.from_methods("vhr"), None)
    assert resolved.vhr.alpha == 2.0


def test_resolving_twice_changes_nothing_and_other_methods_are_untouched(model, tuned_map):
    guarded = vlm_guard.wrap(model, None, GuardConfig(vhr=VHRConfig(alpha=3.0), pai=PAIConfig()), head_map=tuned_map)
    try:
        first = guarded.guard_config
        guarded.set_config(first)
        assert guarded.guard_config == first
        assert guarded.guard_config.vhr.alpha == 3.0 and guarded.guard_config.pai.alpha == 0.4
        assert guarded.guard_config.pai.gamma == PAIConfig().gamma
        lines = guarded.describe_settings()
        assert "alpha=3.0 (config)" in lines[0] and "target_layers=[2, 3] (tuned)" in lines[0]
        assert "alpha=0.4 (tuned)" in lines[1]
    finally:
        guarded.unwrap()


def test_tuned_values_reach_the_math(model, tuned_map):
    """The forward with tuned settings equals the one with the same values set by hand, and differs from the
    released default's."""
    batch = build_batch(model, [(True, 6), (True, 9)])
    guarded = vlm_guard.wrap(model, None, GuardConfig.from_methods("vhr"), head_map=tuned_map)
    try:
        with torch.no_grad():
            tuned_logits = guarded(**batch).logits
            guarded.set_config(GuardConfig(vhr=VHRConfig(alpha=1.5, target_layers=[2, 3])))
            by_hand = guarded(**batch).logits
            guarded.set_config(GuardConfig(vhr=VHRConfig(alpha=2.0, target_layers=None, selection="per_sample")))
            released = guarded(**batch).logits
    finally:
        guarded.unwrap()
    assert torch.equal(tuned_logits, by_hand)
    assert not torch.allclose(tuned_logits, released)


def test_auto_method_set(model, head_map, tuned_map):
    assert default_methods(head_map)[0] == list(UNTUNED_DEFAULT_METHODS) == ["pai"]
    assert default_methods(None)[0] == ["pai"]
    assert default_methods(tuned_map)[0] == ["vhr", "pai"]
    guarded = vlm_guard.wrap(model, None, "auto", head_map=tuned_map)
    try:
        assert guarded.guard_config.enabled_methods == ["vhr", "pai"] and guarded.guard_config.pai.alpha == 0.4
        guarded.set_config("auto")
        assert guarded.guard_config.enabled_methods == ["vhr", "pai"]
    finally:
        guarded.unwrap()
    nothing_helps = tuned_map
    nothing_helps.tuned = {**tuned_map.tuned, "default_methods": []}
    assert default_methods(nothing_helps)[0] == []


def test_untuned_default_set_is_not_harmful_in_the_projects_table():
    """The methods on by default before tuning are not significantly worse than greedy on any column of
    docs/results/synthetic.summary.json (VHR+GIFT and VHR+VAR+GIFT at released settings are)."""
    summary = json.loads((ROOT / "docs/results/synthetic.summary.json").read_text())
    label = "+".join(UNTUNED_DEFAULT_METHODS)
    if label not in summary["metrics"]:
        pytest.skip(f"the results table has no row {label!r}")
    worse = []
    for task, metrics in summary["metrics"][label]["vs_greedy"].items():
        for name, test in metrics.items() if isinstance(metrics, dict) else ():
            if not isinstance(test, dict) or not test.get("significant"):
                continue
            lower_is_better = name.startswith("chair_")
            if (test["diff"] > 0) == lower_is_better:
                worse.append((task, name, test["diff"]))
    assert not worse
    harmful = [
        label
        for label in ("gift", "all")
        if label in summary["metrics"]
        and any(
            test.get("significant") and (test["diff"] > 0) == name.startswith("chair_")
            for metrics in summary["metrics"][label]["vs_greedy"].values()
            if isinstance(metrics, dict)
            for name, test in metrics.items()
            if isinstance(test, dict)
        )
    ]
    assert harmful, "the check above must be able to see a harmful row"


def test_tuned_settings_survive_save_and_load(tuned_map, tmp_path):
    tuned_map.save_pretrained(tmp_path / "map")
    loaded = HeadMap.from_pretrained(tmp_path / "map")
    assert loaded.tuned == tuned_map.tuned and loaded == tuned_map
    assert "tuned" not in json.loads(
        json.dumps(HeadMap.to_json(type(tuned_map)(**{**tuned_map.__dict__, "tuned": {}})))
    )


def test_heads_show_prints_tuned_settings_and_their_source(tuned_map, tmp_path, capsys):
    from vlm_guard.cli import main

    tuned_map.save_pretrained(tmp_path / "map")
    assert main(["heads", "show", str(tmp_path / "map")]) == 0
    out = capsys.readouterr().out
    tuned_part = out.split("\ntuned settings", 1)[1]
    rows = [line.split() for line in tuned_part.splitlines() if line.strip().startswith(("vhr ", "pai ", "gift "))]
    assert ["vhr", "alpha", "1.5", "tuned", "2.0"] == rows[0][:5]
    assert any(row[:2] == ["gift", "(all)"] and "default" in " ".join(row) for row in rows)
    assert "default method set: vhr,pai" in out


# ---------------------------------------------------------------------------------------------- objective
def test_objective_by_hand():
    results = {
        "pope/adversarial": [{"c": 1, "y": 1}, {"c": 0, "y": 1}, {"c": 1, "y": 0}, {"c": 1, "y": 0}],  # error 25 %
        "pope/random": [{"c": 1, "y": 1}, {"c": 1, "y": 0}],
        "chair": [{"m": 3, "h": 1, "g": 2, "r": 2}, {"m": 2, "h": 0, "g": 3, "r": 1}],  # CHAIR_I 1/5, recall 3/5
    }
    metrics = objective.metrics(results)
    assert metrics["chair"]["chair_i"] == pytest.approx(20.0) and metrics["chair"]["recall"] == pytest.approx(60.0)
    assert metrics["chair"]["chair_s"] == pytest.approx(50.0)
    assert objective.score(metrics) == pytest.approx(45.0)
    greedy = objective.metrics(
        {**results, "chair": [{"m": 3, "h": 1, "g": 2, "r": 2}, {"m": 2, "h": 0, "g": 3, "r": 2}]}
    )
    assert objective.violations(metrics, greedy) == ["recall -20.0"]  # 80 % -> 60 %
    assert objective.violations(metrics, metrics) == []
    worse_random = objective.metrics({**results, "pope/random": [{"c": 1, "y": 1}, {"c": 0, "y": 1}]})
    assert objective.violations(worse_random, metrics) == ["pope/random acc -50.0"]
    assert objective.rank_key(1.0, ["x"]) > objective.rank_key(99.0, [])
    # no trading: fewer POPE errors bought with more hallucinated caption objects is infeasible, and the reverse
    more_hallucination = objective.metrics(
        {
            **results,
            "chair": [{"m": 3, "h": 2, "g": 2, "r": 2}, {"m": 2, "h": 0, "g": 3, "r": 1}],
            "pope/adversarial": [{"c": 1, "y": 1}] * 4,
        }
    )
    assert objective.score(more_hallucination) < objective.score(metrics)
    assert objective.violations(more_hallucination, metrics) == ["CHAIR_I +20.0"]
    more_pope_errors = objective.metrics({**results, "pope/adversarial": [{"c": 0, "y": 1}] * 4})
    assert objective.violations(more_pope_errors, metrics) == ["POPE error +75.0"]


# ---------------------------------------------------------------------------------------------- the search
class FakeGenerator:
    """Stands in for generate_answers: a deterministic answer per (setting, prompt, image), counting the rows
    generated; raises KeyboardInterrupt after ``stop_after`` calls (an interrupted run)."""

    def __init__(self, stop_after=None):
        self.rows = 0
        self.calls = 0
        self.stop_after = stop_after

    def __call__(self, guarded, processor, images, prompts, max_new_tokens, **kwargs):
        if self.stop_after is not None and self.calls >= self.stop_after:
            raise KeyboardInterrupt
        self.calls += 1
        self.rows += len(prompts)
        setting = json.dumps(guarded.guard_config.to_dict(), sort_keys=True)
        answers = []
        for image, prompt in zip(images, prompts):
            digest = int(hashlib.sha256((setting + prompt).encode() + image.tobytes()[::97]).hexdigest(), 16)
            if "is there" in prompt.lower():
                answers.append("yes" if digest % 2 else "no")
            else:
                objects = ["house", "tree", "moon", "star", "cup", "plate", "kite", "dog", "cat", "man"]
                answers.append(
                    " , ".join(f"a big red {objects[(digest >> (4 * k)) % 10]}" for k in range(1 + digest % 3)) + " ."
                )
        return answers


def _run_tune(monkeypatch, generator, out, data=None, **kwargs):
    from vlm_guard.tuning import search

    monkeypatch.setattr("vlm_guard.eval.runner.generate_answers", generator)
    model, processor = vlm_guard.load_default()
    head_map = HeadMap.from_pretrained(ROOT / "docs/results/head_map_default")
    data = data or search.synthetic_tuning_data(n_questions=18, n_captions=18)
    return search.tune(
        model,
        processor,
        head_map,
        methods=["pai", "vcd"],
        data=data,
        out_dir=out,
        budget_minutes=30,
        batch_size=8,
        progress=False,
        **kwargs,
    )


def _stable(tuned):
    return {k: v for k, v in tuned.items() if k not in ("search", "created_utc")}


@pytest.mark.slow
def test_search_resumes_where_it_stopped(monkeypatch, tmp_path):
    whole = FakeGenerator()
    reference = _run_tune(monkeypatch, whole, tmp_path / "whole")
    assert reference.complete and whole.rows > 0
    assert set(reference.tuned["settings"]) | set(reference.tuned["skipped"]) == {"pai", "vcd"}  # tuned, or why not
    # a successive-halving plan: the smallest rung runs every setting, the last only the survivors
    pai_rows = [row for row in reference.table if row["stage"] == "pai"]
    assert [sum(1 for r in pai_rows if r["rung"] == k) for k in range(3)] == [5, 2, 1]

    interrupted = FakeGenerator(stop_after=7)
    with pytest.raises(KeyboardInterrupt):
        _run_tune(monkeypatch, interrupted, tmp_path / "resumed")
    assert json.loads((tmp_path / "resumed" / "tune_state.json").read_text())["trials"]
    rest = FakeGenerator()
    resumed = _run_tune(monkeypatch, rest, tmp_path / "resumed")
    assert interrupted.rows + rest.rows == whole.rows  # nothing generated twice, nothing lost
    assert _stable(resumed.tuned) == _stable(reference.tuned)
    again = FakeGenerator()
    _run_tune(monkeypatch, again, tmp_path / "resumed")
    assert again.rows == 0  # a finished state generates nothing more
    saved = HeadMap.from_pretrained(tmp_path / "resumed")
    assert _stable(saved.tuned) == _stable(reference.tuned)
    assert (tmp_path / "resumed" / "tune_pai.png").is_file() and (tmp_path / "resumed" / "tuning.md").is_file()


def test_state_of_another_run_is_refused(monkeypatch, tmp_path):
    from vlm_guard.tuning import search

    state = tmp_path / "out" / "tune_state.json"
    state.parent.mkdir()
    state.write_text(
        json.dumps({"format": "vlm_guard.tune_state", "identity": {"fingerprint_hash": "other"}, "trials": {}})
    )
    with pytest.raises(ValueError, match="another model or tuning data"):
        _run_tune(monkeypatch, FakeGenerator(), tmp_path / "out")
    with pytest.raises(ValueError, match="reported benchmark"):
        search.synthetic_tuning_data(seed=900_001)


# ---------------------------------------------------------------------------------------------- eval labels
def test_eval_labels_released_and_tuned(tuned_map):
    from vlm_guard.eval.runner import guard_config_for, method_display_name, method_label, parse_compare

    assert method_label("VHR,pai@tuned") == "vhr+pai@tuned" and method_label("none@tuned") == "none"
    assert parse_compare("vhr;vhr@tuned;all@tuned") == ["none", "vhr", "vhr@tuned", "all@tuned"]
    assert method_display_name("all@tuned") == "VHR+VAR+GIFT tuned" and method_display_name("vhr") == "VHR"
    released, _ = resolve_config(guard_config_for("vhr+pai"), tuned_map)  # a plain row stays at released values
    assert released.vhr.alpha == 2.0 and released.pai.alpha == PAIConfig().alpha
    tuned, _ = resolve_config(guard_config_for("vhr+pai@tuned"), tuned_map)
    assert tuned.vhr.alpha == 1.5 and tuned.vhr.target_layers == [2, 3] and tuned.pai.alpha == 0.4


# ---------------------------------------------------------------------------------------------- caption / shipped map
def test_caption_says_which_settings_ran_and_where_from(capsys):
    from vlm_guard.cli import main

    assert main(["caption", "--methods", "vhr", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    settings = [line for line in out.splitlines() if line.startswith("settings vhr:")]
    assert settings and ("(tuned)" in settings[0] or "released defaults" in settings[0])
    assert main(["caption", "--max-new-tokens", "4"]) == 0  # default: auto
    out = capsys.readouterr().out
    methods_line = next(line for line in out.splitlines() if line.startswith("methods:"))
    model, processor = vlm_guard.load_default()
    expected, _ = default_methods(vlm_guard.wrap(model, processor).head_map)
    assert methods_line.split()[1] == (",".join(expected) or "none")


def test_caption_says_so_when_tuning_enabled_no_method(capsys, tmp_path):
    """A model whose tuning found no method that helps: `caption` runs none, and says why and what to do."""
    import copy

    from vlm_guard.cli import main

    model, processor = vlm_guard.load_default()
    shipped = vlm_guard.wrap(model, processor).head_map
    empty = copy.copy(shipped)
    empty.tuned = {"settings": {}, "default_methods": [], "tuning_data": {"name": "test tuning data"}}
    empty.save_pretrained(tmp_path / "map")
    assert main(["caption", "--head-map", str(tmp_path / "map"), "--max-new-tokens", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("methods: none (`vlm-guard tune` found no method that helps") for line in lines)
    assert any("the guarded caption is the plain one" in line and "--methods" in line for line in lines)
    plain = next(line for line in lines if line.startswith("plain "))
    guarded = next(line for line in lines if line.startswith("guarded (none)"))
    assert plain.split("]", 1)[1] == guarded.split("]", 1)[1]


def test_caption_all_examples_counts_hallucinations(capsys):
    from vlm_guard.cli import main

    assert main(["caption", "--all-examples", "--methods", "vhr", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    examples = sorted((vlm_guard.defaults.EXAMPLES_DIR).glob("*.png"))
    assert out.count("\nimage: ") == len(examples) >= 5
    total = out.strip().splitlines()[-1]
    assert total.startswith(f"all {len(examples)} bundled examples: hallucinated object mentions")
    plain = sum(
        int(re.match(r".+?(?: \((\d+) mentions\))?$", item).group(1) or 1)
        for line in out.splitlines()
        if line.startswith("not in the scene (plain)")
        for item in line.split(": ", 1)[1].split(", ")
        if item != "none"
    )
    assert f"plain {plain}," in total
    assert main(["caption", "x.png", "--all-examples"]) == 2


def test_default_model_finds_its_shipped_tuned_head_map():
    from vlm_guard.tuning.shipped import SHIPPED_HEAD_MAPS

    if not any(SHIPPED_HEAD_MAPS.glob("*/head_map.json")):
        pytest.skip("no shipped head map in this installation")
    model, processor = vlm_guard.load_default()
    guarded = vlm_guard.wrap(model, processor, "auto")
    try:
        assert guarded.head_map is not None and guarded.head_map.tuned.get("settings")
        assert guarded.guard_config.enabled_methods == guarded.head_map.tuned["default_methods"]
        for name in guarded.guard_config.enabled_methods:
            tuned_fields = guarded.head_map.tuned["settings"].get(name, {})
            assert all(guarded.settings_sources[name][f] == SOURCE_TUNED for f in tuned_fields)
            assert all(getattr(getattr(guarded.guard_config, name), f) == v for f, v in tuned_fields.items())
    finally:
        guarded.unwrap()


def test_run_fingerprint_records_the_tuned_values_that_ran(model, tuned_map, head_map):
    from vlm_guard.eval.runner import guard_config_for, head_map_digest, run_fingerprint

    assert head_map_digest(tuned_map) == head_map_digest(head_map)  # tuned values are in guard_config.* instead
    guarded = vlm_guard.wrap(model, None, None, head_map=tuned_map)
    try:
        guarded.set_config(guard_config_for("vhr@tuned"))
        tuned = run_fingerprint(guarded, None, "vhr@tuned", guarded.guard_config, [])
        guarded.set_config(guard_config_for("vhr"))
        released = run_fingerprint(guarded, None, "vhr", guarded.guard_config, [])
    finally:
        guarded.unwrap()
    assert tuned["guard_config.vhr.alpha"] == 1.5 and released["guard_config.vhr.alpha"] == 2.0


from test_eval_runner import coco_fixture  # noqa: E402,F401  (fixture)


def test_tuning_on_the_users_pope_and_coco_files(monkeypatch, tmp_path, coco_fixture):  # noqa: F811
    """The user's own POPE-format and COCO-format files, through the loaders of `vlm-guard eval`; an unreadable
    image is skipped (left out of every setting's metrics), not fatal."""
    from vlm_guard.tuning import search

    data = search.file_tuning_data(
        [str(coco_fixture / "coco_pope_random.json")],
        str(coco_fixture / "val2014"),
        str(coco_fixture / "instances_val2014.json"),
        str(coco_fixture / "captions_val2014.json"),
        n_images=4,
        seed=0,
    )
    assert [task.name for task in data.tasks] == ["pope/random", "chair"]
    result = _run_tune(monkeypatch, FakeGenerator(), tmp_path / "files", data=data)
    assert result.complete and result.tuned["tuning_data"]["kind"] == "files"
    last = [row for row in result.table if row["stage"] == "pai" and row["rung"] == 2][0]
    total = len(data.tasks[0].items)
    assert last["n"]["pope/random"] == total - 2  # the corrupt image's two questions are left out
    with pytest.raises(ValueError, match="both --instances and --captions"):
        search.file_tuning_data([], str(coco_fixture / "val2014"), str(coco_fixture / "instances_val2014.json"))


def test_tuning_refuses_pope_files_whose_images_are_not_in_the_folder(tmp_path, coco_fixture, caplog):  # noqa: F811
    """POPE questions naming images that are not in --images would tune on zero POPE items (and still ship a
    setting): refused before any work; a file with some images missing warns and keeps the others."""
    from vlm_guard.tuning import search

    elsewhere = tmp_path / "train2014"
    elsewhere.mkdir()
    with pytest.raises(ValueError, match=r"--pope .*coco_pope_random.json: none of its \d+ images .* is in --images"):
        search.file_tuning_data([str(coco_fixture / "coco_pope_random.json")], str(elsewhere))
    lines = [line for line in (coco_fixture / "coco_pope_random.json").read_text().splitlines() if line.strip()]
    first_image = json.loads(lines[0])["image"]
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / first_image).write_bytes((coco_fixture / "val2014" / first_image).read_bytes())
    with caplog.at_level("WARNING", logger="vlm_guard.tuning.search"):
        data = search.file_tuning_data([str(coco_fixture / "coco_pope_random.json")], str(partial))
    assert data.tasks[0].name == "pope/random"
    assert any("are not in" in record.getMessage() for record in caplog.records)


def test_shipped_maps_can_be_switched_off(monkeypatch):
    from vlm_guard.tuning.shipped import SHIPPED_ENV, SHIPPED_HEAD_MAPS

    if not any(SHIPPED_HEAD_MAPS.glob("*/head_map.json")):
        pytest.skip("no shipped head map in this installation")
    monkeypatch.setenv(SHIPPED_ENV, "0")
    model, processor = vlm_guard.load_default()
    guarded = vlm_guard.wrap(model, processor, "vhr")
    try:
        assert guarded.head_map is None and guarded.guard_config.vhr.alpha == VHRConfig().alpha
    finally:
        guarded.unwrap()


@pytest.mark.slow
def test_a_winner_that_breaks_a_constraint_on_the_confirmation_rung_is_not_shipped(monkeypatch, tmp_path):
    """Successive halving picks winners on small rungs; the confirmation rung measures them again and a winner that
    fails there keeps its method at the released defaults (and the default set never holds it)."""
    from vlm_guard.tuning import search

    real_measure = search._Search.measure

    def measure(self, candidate, rung, greedy):
        row = real_measure(self, candidate, rung, greedy)
        if rung == search.RUNGS and "pai" in candidate.methods:  # PAI loses on the larger rung
            row = {**row, "violations": ["POPE error +3.0"], "feasible": False, "score": row["greedy_score"] + 3.0}
        return row

    monkeypatch.setattr(search._Search, "measure", measure)
    result = _run_tune(monkeypatch, FakeGenerator(), tmp_path / "confirmed")
    state = json.loads((tmp_path / "confirmed" / "tune_state.json").read_text())
    assert len(state["plan"]["rungs"]) == search.RUNGS + 1 and state["plan"]["confirm_items"] == search.CONFIRM_ITEMS
    confirm = [row for row in result.table if row["stage"] == "confirm"]
    assert confirm and all(row["rung"] == search.RUNGS for row in confirm)
    assert "pai" not in result.tuned["settings"] and "pai" not in result.tuned["default_methods"]
    # (deterministic fake answers: PAI's best setting on the halving rungs is feasible, so it was confirmed)
    assert [row["label"] for row in confirm if list(row["methods"]) == ["pai"]] == ["pai alpha=0.1"]
    assert "confirmation rung" in result.tuned["skipped"]["pai"]

    plain = _run_tune(monkeypatch, FakeGenerator(), tmp_path / "unconfirmed", confirm_items=0)
    assert not [row for row in plain.table if row["stage"] == "confirm"]
    assert len(json.loads((tmp_path / "unconfirmed" / "tune_state.json").read_text())["plan"]["rungs"]) == search.RUNGS
    with pytest.raises(ValueError, match="confirm_items"):
        _run_tune(monkeypatch, FakeGenerator(), tmp_path / "bad", confirm_items=-1)


# ---------------------------------------------------------------------------------------------- task profiles
def _profiles_section():
    return {
        "format": "profiles",
        "default_profile": "caption",
        "tuning_data": {"name": "test data"},
        "profiles": {
            "caption": {"settings": {"pai": {"alpha": 0.3, "gamma": 1.0}}, "default_methods": ["pai"]},
            "answer": {"settings": {}, "default_methods": []},
        },
    }


@pytest.fixture()
def profiles_map(head_map):
    import copy

    tuned = copy.copy(head_map)
    tuned.tuned = _profiles_section()
    return tuned


def test_auto_takes_the_tasks_profile_and_says_which(model, profiles_map):
    processor = None
    for request, task, methods in (
        ("auto:caption", None, ["pai"]),
        ("auto", "caption", ["pai"]),
        ("auto", None, ["pai"]),
        ("auto:answer", None, []),
        ("auto", "answer", []),
    ):
        guarded = vlm_guard.wrap(model, processor, request, head_map=profiles_map, task=task)
        try:
            assert guarded.guard_config.enabled_methods == methods, (request, task)
            lines = guarded.describe_settings()
            expected = task or (request.split(":")[1] if ":" in request else "caption")
            assert lines[-1].startswith(f"profile: {expected} ("), lines
            if methods:
                assert guarded.guard_config.pai.alpha == 0.3 and guarded.guard_config.pai.gamma == 1.0
                assert guarded.settings_sources["pai"]["alpha"] == SOURCE_TUNED
            else:
                assert lines[-2] == "methods: none (the plain model)"
        finally:
            guarded.unwrap()


def test_an_unknown_task_is_a_clear_error(model, profiles_map):
    processor = None
    for kwargs in (
        {"config": "auto:vqa"},
        {"config": "auto", "task": "vqa"},
        {"config": "auto:caption", "task": "answer"},
    ):
        with pytest.raises(ValueError) as error:
            vlm_guard.wrap(model, processor, head_map=profiles_map, **kwargs)
        message = str(error.value)
        assert "\n" not in message and ("unknown task 'vqa'" in message or "different tasks" in message), message
    assert not any(name.startswith("_vlm_guard") for name in vars(model))  # nothing was installed


def test_the_single_profile_of_an_older_map_serves_every_task(model, tuned_map):
    processor = None
    for task in ("caption", "answer", None):
        guarded = vlm_guard.wrap(model, processor, "auto", head_map=tuned_map, task=task)
        try:
            assert guarded.guard_config.enabled_methods == ["vhr", "pai"]
            assert guarded.describe_settings()[-1].startswith("profile: single (a map tuned before task profiles")
        finally:
            guarded.unwrap()


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda t: t.__setitem__("settings", [1, 2]), "tuned.settings"),
        (lambda t: t.__setitem__("default_methods", "vhr,magic"), "tuned.default_methods"),
        (lambda t: t.__setitem__("default_methods", 3), "tuned.default_methods"),
        (lambda t: t["settings"].__setitem__("pai", {"alpha": -1.0}), "tuned.settings.pai"),
        (lambda t: t["settings"].__setitem__("pai", {"strength": 1.0}), "tuned.settings.pai"),
        (lambda t: t["settings"].__setitem__("magic", {}), "tuned.settings"),
        (
            lambda t: t.clear() or t.update(_profiles_section()) or t["profiles"].__setitem__("vqa", {}),
            "tuned.profiles",
        ),
        (
            lambda t: t.clear() or t.update(_profiles_section()) or t.__setitem__("default_profile", "vqa"),
            "tuned.default_profile",
        ),
        (
            lambda t: (
                t.clear() or t.update(_profiles_section()) or t["profiles"]["caption"].__setitem__("settings", "pai")
            ),
            "tuned.profiles.caption.settings",
        ),
        (
            lambda t: t.clear() or t.update(_profiles_section()) or t["profiles"]["answer"].pop("default_methods"),
            "tuned.profiles.answer.default_methods",
        ),
    ],
)
def test_a_malformed_tuned_section_is_refused_naming_the_file_and_field(tuned_map, tmp_path, edit, field):
    from vlm_guard.calibration.head_map import HeadMapFileError

    tuned_map.save_pretrained(tmp_path / "map")
    path = tmp_path / "map" / "head_map.json"
    data = json.loads(path.read_text())
    edit(data["tuned"])
    path.write_text(json.dumps(data))
    with pytest.raises(HeadMapFileError) as error:
        HeadMap.from_pretrained(tmp_path / "map")
    message = str(error.value)
    assert message.startswith(f"{path}: field {field}") and "\n" not in message and "vlm-guard tune" in message, message


def test_a_method_list_written_as_text_is_read_as_the_list(tuned_map, tmp_path):
    """`"vhr,pai"` for default_methods (the spelling GuardConfig.from_methods takes) runs those methods, never none."""
    tuned_map.save_pretrained(tmp_path / "map")
    path = tmp_path / "map" / "head_map.json"
    data = json.loads(path.read_text())
    data["tuned"]["default_methods"] = "vhr,pai"
    path.write_text(json.dumps(data))
    loaded = HeadMap.from_pretrained(tmp_path / "map")
    assert default_methods(loaded)[0] == ["vhr", "pai"]


def test_profiles_section_survives_save_and_load(profiles_map, tmp_path):
    from vlm_guard.settings import tuned_report

    profiles_map.save_pretrained(tmp_path / "map")
    loaded = HeadMap.from_pretrained(tmp_path / "map")
    assert loaded.tuned["profiles"] == _profiles_section()["profiles"]
    report = "\n".join(tuned_report(loaded))
    assert "profile caption" in report and "profile answer" in report and "alpha" in report


# ---------------------------------------------------------------------------------------------- the profile tuner
def _items(pairs):
    return [{"h": h, "m": m, "g": 2, "r": r} for h, m, r in pairs]


def test_gains_and_constraints_are_judged_by_paired_intervals():
    from vlm_guard.tuning.profiles import judge

    base = _items([(1, 4, 2)] * 100)
    better = _items([(0, 4, 2)] * 60 + [(1, 4, 2)] * 40)  # CHAIR_I 25 -> 10: a clear gain
    noisy = _items([(0, 4, 2)] * 3 + [(1, 4, 2)] * 97)  # 25 -> 24.25 on 3 items of 100: within the noise
    lossy = _items([(0, 4, 0)] * 60 + [(1, 4, 2)] * 40)  # fewer hallucinations but recall -60 points
    assert judge("caption", {"chair": better}, {"chair": base})["significant"]
    j = judge("caption", {"chair": noisy}, {"chair": base})
    assert j["gain"] > 0 and not j["significant"]  # a point gain that "no loss on any item" would take
    j = judge("caption", {"chair": lossy}, {"chair": base})
    assert j["significant"] and j["broken"] == ["recall"] and not j["kept"]
    pope = {
        t: [{"c": 1, "y": 1}] * 80 + [{"c": 0, "y": 1}] * 20
        for t in ("pope/random", "pope/popular", "pope/adversarial")
    }
    worse = dict(pope, **{"pope/random": [{"c": 1, "y": 1}] * 50 + [{"c": 0, "y": 1}] * 50})
    j = judge("answer", worse, pope)
    assert j["broken"] == ["pope/random"] and not j["significant"]


def test_rung_size_is_the_n_that_resolves_the_target_effect():
    import numpy as np

    from vlm_guard.tuning.profiles import full_rung_size, paired

    # a 1/sqrt(n) law: the half-width at the computed n is about the target
    rng = np.random.default_rng(0)
    base = [{"c": int(x)} for x in rng.random(2400) < 0.8]
    own = [{"c": b["c"] if rng.random() > 0.1 else 1 - b["c"]} for b in base]  # 10 % of answers flip
    pilot = paired(own[:100], base[:100], "accuracy")
    sizing = full_rung_size(100, [(pilot["high"] - pilot["low"]) / 2], 2400, target=2.0)
    at_n = paired(own[: sizing["n"]], base[: sizing["n"]], "accuracy")
    assert 1.4 <= (at_n["high"] - at_n["low"]) / 2 <= 2.6, (sizing, at_n)
    assert full_rung_size(60, [1.0], 600)["n"] == 60  # never below the pilot
    capped = full_rung_size(60, [10.0], 600)
    assert capped["n"] == 600 and capped["capped"] and "capped" in capped["rule"]


def test_ranking_prefers_the_cheaper_of_two_close_winners():
    from vlm_guard.tuning.profiles import rank

    def row(label, gain, passes, significant=True, kept=True):
        return {"label": label, "passes": passes, "judgement": {"gain": gain, "significant": significant, "kept": kept}}

    rows = [row("contrast", 3.0, 2), row("attention", 2.7, 1), row("big", 5.0, 2, kept=False), row("ns", 4.0, 1, False)]
    assert [r["label"] for r in rank(rows)] == ["attention", "contrast"]


def test_pai_attention_only_runs_one_forward_per_token():
    """gamma=1 switches PAI's contrast off and skips its image-free pass: as many forwards as the plain model."""
    from vlm_guard.tuning.space import Candidate, forward_passes

    model = tiny_model("llava")
    processor = None
    batch = build_batch(model, [(True, 5)])
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
    try:
        counts = {}
        for name, config in (
            ("plain", None),
            ("attention", GuardConfig(pai=PAIConfig(alpha=0.2, gamma=1.0))),
            ("released", GuardConfig(pai=PAIConfig(alpha=0.2, gamma=1.1))),
        ):
            guarded = vlm_guard.wrap(model, processor, config)
            try:
                calls.clear()
                with torch.no_grad():
                    guarded.generate(**batch, max_new_tokens=5, do_sample=False, min_new_tokens=5)
                counts[name] = len(calls)
            finally:
                guarded.unwrap()
    finally:
        handle.remove()
    assert counts["attention"] == counts["plain"] and counts["released"] > counts["plain"], counts
    assert forward_passes(Candidate({"pai": {"alpha": 0.2, "gamma": 1.0}})) == 1
    assert forward_passes(Candidate({"pai": {"alpha": 0.0, "gamma": 1.1}})) == 2


def test_profile_space_holds_method_parts_and_presets():
    from vlm_guard.tuning.space import profile_candidates

    caption = profile_candidates("caption", num_layers=30)
    labels = [c.label for c in caption]
    assert "pai alpha=0.2 gamma=1" in labels and "pai alpha=0.2 gamma=1.1" in labels  # attention half, whole PAI
    assert "var preset=paper" in labels
    var = next(c for c in caption if "var" in c.methods).guard_config().var
    assert var.preset == "paper" and var.p == 0.6  # the preset's own values
    assert "pai alpha=0 gamma=1.1" in [c.label for c in profile_candidates("answer", num_layers=30)]  # contrast half
    with pytest.raises(ValueError, match="unknown task profile 'vqa'"):
        profile_candidates("vqa", num_layers=30)


def test_profile_space_for_named_methods_is_each_methods_strength_ladder():
    from vlm_guard.tuning.space import profile_candidates

    gift = profile_candidates("caption", num_layers=30, methods=["gift"])
    assert {tuple(c.methods) for c in gift} == {("gift",)}
    alphas = sorted(c.guard_config().gift.alpha for c in gift)
    assert alphas == [0.5, 1.0, 2.0, 3.0, 5.0]  # the ladder; the released alpha 5 once, not twice
    vhr = profile_candidates("caption", num_layers=30, methods=["vhr"])
    layers = {tuple(c.guard_config().vhr.target_layers or ()) for c in vhr}
    assert tuple(range(15, 30)) in layers and () in layers  # the profile's late-half 1.1 and the released layers
    assert sorted({c.guard_config().vhr.alpha for c in vhr}) == [1.1, 1.25, 1.5, 2.0, 3.0]
    var = profile_candidates("caption", num_layers=30, methods=["var"])
    assert "var preset=paper" in [c.label for c in var] and {c.guard_config().var.tau for c in var} == {20.0}
    both = profile_candidates("caption", num_layers=30, methods=["vhr", "gift"])
    assert len(both) == len(vhr) + len(gift) and not any("pai" in c.methods for c in both)
    with pytest.raises(ValueError, match="choose from"):
        profile_candidates("caption", num_layers=30, methods=["nope"])


@pytest.mark.slow
@pytest.mark.xfail(
    strict=False,
    reason="a resumed profile tuning's table differed from the first run's in one CI run "
    "(not reproduced in the tuner's own runs); under investigation",
)
def test_profile_tuning_confirms_on_a_separate_split_and_resumes(tmp_path, monkeypatch):
    """A small run on the fixture: the table has pilot/full rows with intervals, the map loads with both profiles,
    and a rerun of the same command generates nothing new (everything is read back from the states)."""
    from vlm_guard.defaults import load_fixture
    from vlm_guard.tuning import profiles

    model, processor = load_fixture()
    guarded = vlm_guard.wrap(model, processor)
    head_map = guarded.head_map
    guarded.unwrap()
    kwargs = dict(
        out_dir=tmp_path / "map",
        n_items=12,
        pilot_items={"caption": 6, "answer": 6},
        batch_size=6,
        world="shapes",
        progress=False,
    )
    first = profiles.tune_profiles(model, processor, head_map, **kwargs)
    assert set(first["profiles"]) == {"caption", "answer"}
    for section in first["profiles"].values():
        rungs = {row["rung"] for row in section["table"]}
        assert "pilot" in rungs and all(
            {"diff", "low", "high", "n"} <= set(r["judgement"]["objective"]) for r in section["table"]
        )
        assert section["rungs"]["sizing"]["rule"].startswith("n = 6 * (")
    assert first["confirmation_data"]["world_seed"] == profiles.CONFIRM_SEED != first["tuning_data"]["world_seed"]
    loaded = HeadMap.from_pretrained(tmp_path / "map")
    assert loaded.tuned["profiles"].keys() == first["profiles"].keys()
    assert "### Profile `caption`" in (tmp_path / "map" / "tuning.md").read_text()
    from vlm_guard.tuning import search

    monkeypatch.setattr(search._Search, "_run_batch", lambda *a, **k: pytest.fail("a resumed run generated again"))
    again = profiles.tune_profiles(model, processor, head_map, **kwargs)

    def decisions(tuned):  # the measured time per item is read when a row is made, so it is left out
        return {
            p: [{k: v for k, v in row.items() if k != "time_ratio"} for row in s["table"]]
            for p, s in tuned["profiles"].items()
        }

    assert decisions(again) == decisions(first)
    assert {p: s["settings"] for p, s in again["profiles"].items()} == {
        p: s["settings"] for p, s in first["profiles"].items()
    }


def test_a_setting_the_tuner_measured_as_harmful_is_warned_about_at_wrap(model, head_map, caplog):
    """A method whose exact setting was significantly worse in the head map's tuning table (or lost recall) gets one
    warning with the measured interval; a setting not tried, or tried without harm, gets none."""
    import copy
    import logging

    from vlm_guard.methods.var.intervention import VARConfig

    def row(methods, label, worse, broken=(), n=60):
        return {
            "rung": "pilot",
            "label": label,
            "methods": methods,
            "n": n,
            "judgement": {
                "objective": {
                    "diff": 4.5 if worse else -1.0,
                    "low": 0.8 if worse else -3.0,
                    "high": 8.7 if worse else 1.0,
                    "own": 28.8,
                    "greedy": 24.2,
                    "n": n,
                },
                "objective_name": "CHAIR_I",
                "worse": worse,
                "broken": list(broken),
                "constraints": {"recall": {"diff": -9.0, "low": -12.0, "high": -6.0}},
            },
        }

    tuned = copy.copy(head_map)
    section = _profiles_section()
    section["profiles"]["caption"]["table"] = [
        row({"var": {"preset": "paper"}}, "var preset=paper", worse=True),
        row({"vhr": {"alpha": 1.1}}, "vhr alpha=1.1", worse=False),
        row({"vhr": {"alpha": 3.0}}, "vhr alpha=3", worse=False, broken=["recall"]),
    ]
    tuned.tuned = section
    cases = (
        (GuardConfig(var=VARConfig(preset="paper")), ["var preset=paper made this model worse", "+4.5 points"]),
        (GuardConfig(vhr=VHRConfig(alpha=3.0)), ["vhr alpha=3 made this model worse", "recall -9.0 points"]),
        (GuardConfig(vhr=VHRConfig(alpha=1.1)), None),  # tried, no harm
        (GuardConfig(var=VARConfig()), None),  # released VAR: not tried
    )
    for config, expected in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="vlm_guard.wrapper"):
            guarded = vlm_guard.wrap(model, None, config, head_map=tuned)
            guarded.set_config(config)  # the same setting again: warned once per wrapper
            guarded.unwrap()
        warnings = [r.getMessage() for r in caplog.records if "made this model worse" in r.getMessage()]
        if expected is None:
            assert warnings == [], (config, warnings)
        else:
            assert len(warnings) == 1, warnings
            assert all(part in warnings[0] for part in expected), warnings[0]
            assert "'auto'" in warnings[0] and "vlm-guard heads show" in warnings[0]
    # the answer profile has no table: nothing to warn about
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vlm_guard.wrapper"):
        vlm_guard.wrap(model, None, GuardConfig(var=VARConfig(preset="paper")), head_map=tuned, task="answer").unwrap()
    assert not [r for r in caplog.records if "made this model worse" in r.getMessage()]
