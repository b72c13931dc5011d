"""The demo tells the truth: it starts from the model's tuned settings (not the 7B released strengths), warns about a
setting the tuning table measured as breaking the answers, colours words from a bundled example's ground truth or a
checker that knows the model's world (else none, with a note), and its text is whole (start line, placeholder,
gallery labels, the CLI's prompt)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

gr = pytest.importorskip("gradio")

from vlm_guard.demo.app import DemoHandlers, startup_lines, warnings_markdown  # noqa: E402
from vlm_guard.demo.inputs import DemoLimits, load_examples  # noqa: E402
from vlm_guard.demo.overlay import PLACEHOLDER_FONT_SIZE, wrap_words  # noqa: E402
from vlm_guard.demo.session import (  # noqa: E402
    DEFAULT_PROMPT,
    LABEL_FLAGGED,
    LABEL_GROUNDED,
    DemoSession,
    GenerationResult,
    highlighted,
    row_breaks,
)
from vlm_guard.grounding import TRUTH, Mention, find_mentions, truth_mentions  # noqa: E402
from vlm_guard.synthetic.model import ToyModelSpec, build_model, build_processor  # noqa: E402
from vlm_guard.synthetic.world import World, caption, render  # noqa: E402

SPEC = ToyModelSpec(
    image_size=32,
    patch_size=8,
    vision_hidden=32,
    vision_layers=1,
    vision_heads=2,
    text_hidden=48,
    text_layers=4,
    text_heads=4,
    text_intermediate=96,
    max_positions=128,
)


def _legacy_row(label, methods, n, violations, score):
    return {
        "stage": next(iter(methods)),
        "label": label,
        "methods": methods,
        "rung": 1,
        "n": {"chair": n, "pope/random": n},
        "violations": violations,
        "score": score,
        "feasible": not violations,
    }


# the shape of the shipped v2 map's table (a map tuned before task profiles)
LEGACY_TUNED = {
    "settings": {"var": {"p": 0.2}},
    "default_methods": [],
    "tuning_data": {"name": "synthetic tuning set"},
    "table": [
        _legacy_row(
            "vhr alpha=2",
            {"vhr": {"alpha": 2.0, "target_layers": None}},
            86,
            ["recall -76.9", "POPE error +24.4"],
            80.0,
        ),
        _legacy_row("vhr alpha=1.5", {"vhr": {"alpha": 1.5, "target_layers": None}}, 29, ["recall -40.9"], 33.3),
        _legacy_row("vhr alpha=1.1", {"vhr": {"alpha": 1.1, "target_layers": None}}, 10, ["recall -5.0"], 38.9),
        _legacy_row("vhr alpha=1.1 late", {"vhr": {"alpha": 1.1, "target_layers": [2, 3]}}, 300, [], 44.6),
        _legacy_row("pai alpha=0.2", {"pai": {"alpha": 0.2}}, 86, ["POPE error +1.2"], 40.7),
        _legacy_row("vhr+pai", {"vhr": {"alpha": 1.1}, "pai": {"alpha": 0.2}}, 300, [], 30.0),
    ],
}

PROFILE_TUNED = {
    "profiles": {
        "caption": {
            "settings": {},
            "default_methods": [],
            "table": [
                {
                    "rung": "full",
                    "label": "pai alpha=0.4 gamma=1",
                    "methods": {"pai": {"alpha": 0.4, "gamma": 1.0}},
                    "n": 200,
                    "judgement": {"gain": -1.0, "broken": ["recall"], "constraints": {"recall": {"diff": -9.5}}},
                },
                {
                    "rung": "full",
                    "label": "pai alpha=0.1 gamma=1",
                    "methods": {"pai": {"alpha": 0.1, "gamma": 1.0}},
                    "n": 200,
                    "judgement": {"gain": 1.5, "broken": [], "constraints": {"recall": {"diff": -0.5}}},
                },
            ],
        },
        "answer": {"settings": {"pai": {"alpha": 0.9}}, "default_methods": ["pai"], "table": []},
    },
    "default_profile": "caption",
}


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    processor = build_processor(SPEC)
    return build_model(SPEC, processor.tokenizer, seed=0).eval(), processor


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("examples")
    scenes = [World(seed=0).scene(index) for index in range(2)]
    entries = []
    for index, scene in enumerate(scenes):
        render(scene).save(folder / f"scene_{index}_of_world.png")
        entries.append(
            {
                "file": f"scene_{index}_of_world.png",
                "objects": [{"type": o.type} for o in scene.objects],
                "caption": caption(scene),
                "absent_partners": [],
            }
        )
    (folder / "examples.json").write_text(json.dumps(entries))
    return folder


class FlagEverything:
    """A checker that flags every mention (it cannot tell what is in the image)."""

    world = "shapes"

    def __init__(self, knows=True):
        self.knows = knows
        self.calls = 0

    def knows_world(self, world):
        return self.knows

    def check(self, image, text):
        self.calls += 1
        return [
            Mention(word, name, 0.0, True)
            for word, name in find_mentions(
                text, ["house", "tree", "moon", "star", "cup", "plate", "kite", "ball", "ring", "cross"]
            )
        ]


def _session(toy, example_dir, checker=None, tuned=None):
    model, processor = toy
    limits = DemoLimits(max_upload_bytes=200_000, max_image_pixels=512 * 512, max_new_tokens=16, default_new_tokens=6)
    session = DemoSession(
        model, processor, checker=checker, limits=limits, examples=load_examples(example_dir), model_name="random toy"
    )
    if tuned is not None:
        session.guarded.head_map = SimpleNamespace(tuned=tuned)  # only the tuned section is read by these views
        session.start = {name: session._start_setting(name) for name in session.availability}
    return session


# ---------------------------------------------------------------------------- start settings and warnings
def test_sliders_start_from_the_tuned_values_not_the_released_strengths(toy, example_dir):
    session = _session(toy, example_dir, tuned=LEGACY_TUNED)
    try:
        assert session.strength_default("var") == (0.2, "tuned, caption profile")
        value, source = session.strength_default("vhr")  # released 2.0 breaks; the best measured unbroken row wins
        assert value == 1.1 and source.startswith("best measured by tuning, not adopted: vhr alpha=1.1 late, n=300")
        assert session.start_fields()["vhr"] == {"target_layers": [2, 3]}  # run with the slider's alpha
        assert session.strength_default("gift")[1] == "released default"  # never measured
        lines = startup_lines(session)
        assert lines[0].startswith("- Methods on at start: none (") and lines[0].endswith(").")
        assert (
            lines[1].startswith("- Sliders start at: VHR alpha 1.1 (best measured")
            and "GIFT alpha 5 (released default)" in lines[1]
        )
        assert not any(line.rstrip().endswith(":") for line in lines)  # no dangling "strengths:"
    finally:
        session.guarded.unwrap()


def test_a_setting_measured_as_breaking_is_warned_about(toy, example_dir):
    session = _session(toy, example_dir, tuned=LEGACY_TUNED)
    try:
        session.start["vhr"] = session.start["vhr"].__class__(2.0, {}, "test")  # no layer band: the released setting
        warnings = session.setting_warnings({"vhr": 2.0})
        assert len(warnings) == 1 and warnings[0].startswith("VHR alpha=2: the tuning table")
        assert "recall -76.9" in warnings[0] and "POPE error +24.4" in warnings[0] and "n=86" in warnings[0]
        stronger = session.setting_warnings({"vhr": 3.0})  # never measured, but a weaker alpha already broke
        assert len(stronger) == 1 and "weaker setting, alpha=2" in stronger[0]
        assert session.setting_warnings({"vhr": 1.1}) == []  # measured: a 5-point loss is not breaking
        assert session.setting_warnings({"pai": 0.2}) == []
        assert session.setting_warnings({"vhr": None}) == []
        handlers = DemoHandlers(session)
        text = handlers.on_settings(True, 2.0, *(False, 0.5) * 4)
        assert text.startswith("- ⚠ VHR alpha=2") and text == warnings_markdown(warnings)
        run = session.run(str(session.examples[0].path), "describe the image", {"vhr": 2.0}, max_new_tokens=3)
        assert any(note.startswith("Warning: VHR alpha=2") for note in run.notes)
    finally:
        session.guarded.unwrap()


def test_a_profile_table_broken_verdict_is_warned_and_its_unbroken_best_starts(toy, example_dir):
    session = _session(toy, example_dir, tuned=PROFILE_TUNED)
    try:
        assert session.strength_default("pai") == (
            0.1,
            "best measured by tuning, not adopted: pai alpha=0.1 gamma=1, n=200",
        )
        assert session.start_fields()["pai"] == {"gamma": 1.0}
        warnings = session.setting_warnings({"pai": 0.4})
        assert len(warnings) == 1 and "recall -9.5" in warnings[0] and "n=200" in warnings[0]
        assert session.setting_warnings({"pai": 0.1}) == []
        stronger = session.setting_warnings({"pai": 0.9})  # above every measured alpha, none of them at 0.9
        assert len(stronger) == 1, stronger
        assert "weaker setting, alpha=0.4" in stronger[0]  # a weaker measured setting broke: that is the reason given
        assert session.default_methods()[0] == []  # the caption profile's set, not the answer profile's PAI
    finally:
        session.guarded.unwrap()


def test_a_setting_stronger_than_every_measured_one_is_warned_as_unmeasured(toy, example_dir):
    """The shipped v2 map measured VHR only at alpha 1.1 (not breaking): the released alpha 2 is not in the table, so
    the demo says it was never measured on this model instead of staying silent."""
    import copy

    tuned = copy.deepcopy(PROFILE_TUNED)
    tuned["profiles"]["caption"]["table"].append(
        {
            "rung": "full",
            "label": "vhr alpha=1.1",
            "methods": {"vhr": {"alpha": 1.1}},
            "n": 60,
            "judgement": {"gain": 0.5, "broken": [], "constraints": {"recall": {"diff": -0.2}}},
        }
    )
    session = _session(toy, example_dir, tuned=tuned)
    try:
        warnings = session.setting_warnings({"vhr": 2.0})
        assert len(warnings) == 1, warnings
        assert (
            warnings[0].startswith("VHR alpha=2: stronger than every VHR setting")
            and "at most alpha=1.1" in warnings[0]
        )
        assert "may break the answers" in warnings[0]
        assert session.setting_warnings({"vhr": 1.1}) == [] and session.setting_warnings({"vhr": 0.5}) == []
        assert session.setting_warnings({"gift": 9.0}) == []  # GIFT never measured at all: no claim either way
    finally:
        session.guarded.unwrap()


def test_row_breaks_reads_both_table_formats():
    assert row_breaks({"violations": ["CHAIR_I +2.8", "recall -5.0", "pope/popular acc -10.0"]}) == ""
    assert (
        row_breaks({"violations": ["recall -47.5", "pope/popular acc -20.0", "POPE error +10.0"]})
        == "recall -47.5, pope/popular acc -20.0"
    )
    assert row_breaks({"judgement": {"broken": [], "constraints": {}}}) == ""
    assert (
        row_breaks({"judgement": {"broken": ["pope/random"], "constraints": {"pope/random": {"diff": -3.0}}}})
        == "pope/random -3.0"
    )


# ---------------------------------------------------------------------------- grounding colours
def _labels(result):
    return {piece.strip(): label for piece, label in highlighted(result) if piece.strip()}


def test_a_bundled_example_is_coloured_from_its_ground_truth_not_the_checker(toy, example_dir):
    checker = FlagEverything()
    session = _session(toy, example_dir, checker=checker)
    try:
        example = session.examples[0]
        present = example.objects[0]
        absent = next(
            t
            for t in ("house", "tree", "moon", "star", "cup", "plate", "kite", "ball", "ring", "cross")
            if t not in example.objects
        )
        mentions = session._ground(Image.open(example.path), example, f"a {present} and a {absent}")
        assert [(m.object, m.flagged, m.source) for m in mentions] == [(present, False, TRUTH), (absent, True, TRUTH)]
        assert checker.calls == 0
        run = session.run(str(example.path), "describe the image", {}, max_new_tokens=4)
        assert any(note.startswith("Colours: the example's ground truth") for note in run.notes)
        result = GenerationResult(
            "plain",
            f"a {present} , a {absent} .",
            [0, 1, 2, 3, 4, 5],
            ["a", f" {present}", " ,", " a", f" {absent}", " ."],
            0.1,
            mentions=mentions,
        )
        result.tvhd = np.array([1.0, 0.01, 1.0, 1.0, 1.0, 1.0])  # low T-VHD on the present object: the truth wins
        labels = _labels(result)
        assert labels[present] == LABEL_GROUNDED and labels[absent] == LABEL_FLAGGED
        # an upload (no ground truth) goes to the checker
        rng = np.random.default_rng(0)
        upload = Image.fromarray(rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8))
        assert session._ground(upload, session.example_for(upload), "a house")[0].source == "checker"
    finally:
        session.guarded.unwrap()


def test_a_checker_of_another_world_colours_nothing_and_says_so(toy, example_dir, tmp_path):
    session = _session(toy, example_dir, checker=FlagEverything(knows=False))
    try:
        assert session.checker is None
        assert any("knows the shapes world, not this model's" in note for note in session.notes)
        rng = np.random.default_rng(1)
        path = tmp_path / "upload.png"
        Image.fromarray(rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8)).save(path)
        run = session.run(str(path), "describe the image", {}, max_new_tokens=4)
        assert run.plain.mentions == [] and run.guarded.mentions == []
        assert any(note.startswith("Colours hidden: this image has no ground truth") for note in run.notes)
        # a bundled example still gets its ground truth
        example = session.examples[1]
        assert session._ground(Image.open(example.path), example, f"a {example.objects[0]}")[0].source == TRUTH
    finally:
        session.guarded.unwrap()


def test_truth_mentions_are_what_the_page_uses():
    mentions = truth_mentions("a house and a tree", ["house"], vocabulary=["house", "tree"])
    assert [(m.object, m.flagged) for m in mentions] == [("house", False), ("tree", True)]


# ---------------------------------------------------------------------------- text defects
def test_the_default_prompt_is_the_clis(toy, example_dir):
    from vlm_guard.cli.caption import DEFAULT_PROMPT as CLI_PROMPT
    from vlm_guard.synthetic.worlds import world_kind

    assert DEFAULT_PROMPT == CLI_PROMPT == world_kind("everyday").caption_prompt
    session = _session(toy, example_dir)
    try:
        expected = world_kind(session.world).caption_prompt if session.world else CLI_PROMPT
        assert session.default_prompt == expected
    finally:
        session.guarded.unwrap()


def test_placeholder_words_are_separated_and_fit():
    canvas = Image.new("RGB", (384, 384))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=PLACEHOLDER_FONT_SIZE)
    text = "Switch GIFT on to see its saliency map (GIFT is off in this run, so nothing is drawn)."
    lines = wrap_words(text, font, 352, draw)
    assert [w for line in lines for _, w in line] == text.split() and len(lines) >= 2
    for line in lines:
        for (x, word), (next_x, _) in zip(line, line[1:]):
            assert next_x - (x + draw.textlength(word, font=font)) >= 4  # a visible space between words
        last_x, last_word = line[-1]
        assert last_x + draw.textlength(last_word, font=font) <= 352


def test_gallery_labels_are_short_words(example_dir):
    for example in load_examples(example_dir):
        assert "_" not in example.short_label and ":" not in example.short_label and len(example.short_label) <= 24
