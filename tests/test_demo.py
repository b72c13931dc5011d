"""The demo without a browser: input validation, the session's runs and views, the handlers, the CLI guard.

A small random-weight toy LLaVA (with the toy processor and chat template) is built from configs in
the test: no download, CPU only.
"""

import io
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

gr = pytest.importorskip("gradio")

from vlm_guard.cli.demo import check_host, is_loopback  # noqa: E402
from vlm_guard.demo.app import DemoHandlers, build_app, launch_options  # noqa: E402
from vlm_guard.demo.inputs import DemoInputError, DemoLimits, load_examples, validate_image  # noqa: E402
from vlm_guard.demo.overlay import SCALE_WIDTH, ImageGrid, colour_scale, head_map_figure, heatmap_overlay, square_grid  # noqa: E402
from vlm_guard.demo.session import (  # noqa: E402
    LABEL_FLAGGED,
    LABEL_GROUNDED,
    LABEL_WORD,
    METHOD_CONTROLS,
    DemoSession,
    GenerationResult,
    build_guard_config,
    highlighted,
    mention_tokens,
)
from vlm_guard.grounding import Mention  # noqa: E402
from vlm_guard.synthetic.model import ToyModelSpec, build_model, build_processor  # noqa: E402
from vlm_guard.synthetic.world import World, caption, render  # noqa: E402
from vlm_guard.testing import assert_close_scaled, forward_reduction  # noqa: E402

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


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("examples")
    entries = []
    for index in range(2):
        scene = World(seed=0).scene(index)
        render(scene).save(folder / f"scene_{index}.png")
        entries.append(
            {
                "file": f"scene_{index}.png",
                "objects": [{"type": o.type} for o in scene.objects],
                "caption": caption(scene),
                "absent_partners": [],
            }
        )
    (folder / "examples.json").write_text(json.dumps(entries))
    return folder


class FakeChecker:
    """Flags every mention of 'tree'; other objects are grounded."""

    def check(self, image, text):
        from vlm_guard.grounding import find_mentions

        return [
            Mention(word, name, 0.1 if name == "tree" else 0.9, name == "tree")
            for word, name in find_mentions(text, ["house", "tree", "moon", "star", "cup", "plate", "ring"])
        ]


@pytest.fixture(scope="module")
def session(example_dir):
    torch.manual_seed(0)
    processor = build_processor(SPEC)
    model = build_model(SPEC, processor.tokenizer, seed=0).eval()
    limits = DemoLimits(max_upload_bytes=200_000, max_image_pixels=512 * 512, max_new_tokens=16, default_new_tokens=6)
    return DemoSession(
        model,
        processor,
        checker=FakeChecker(),
        limits=limits,
        examples=load_examples(example_dir),
        model_name="random toy",
    )


@pytest.fixture()
def corrupt_png(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"definitely not image data" * 20)
    return path


# ---------------------------------------------------------------------------- validation
def test_validate_image_accepts_a_png_and_returns_rgb(tmp_path):
    path = tmp_path / "ok.png"
    Image.new("L", (40, 30), 128).save(path)
    image = validate_image(str(path), DemoLimits())
    assert image.mode == "RGB" and image.size == (40, 30)


def test_validate_image_refuses_corrupt_file_with_readable_message(corrupt_png):
    with pytest.raises(DemoInputError, match=r'"broken.png" is not a readable image .*Upload a PNG, JPEG or WebP'):
        validate_image(str(corrupt_png), DemoLimits())


def test_validate_image_refuses_truncated_png(tmp_path):
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, format="PNG")
    path = tmp_path / "truncated.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(DemoInputError, match="not a readable image"):
        validate_image(str(path), DemoLimits())


def test_validate_image_refuses_oversized_upload(tmp_path):
    path = tmp_path / "big.png"
    Image.effect_noise((300, 300), 80).convert("RGB").save(path)
    with pytest.raises(DemoInputError, match=r'"big.png" is .* up to 1000 bytes\. Resize or compress'):
        validate_image(str(path), DemoLimits(max_upload_bytes=1000))


def test_validate_image_refuses_too_many_pixels_before_decoding(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (400, 300)).save(path)
    with pytest.raises(DemoInputError, match=r"400x300 = 120,000 pixels; this demo accepts at most 10,000"):
        validate_image(str(path), DemoLimits(max_image_pixels=10_000))


def test_validate_image_refuses_empty_missing_and_none(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(DemoInputError, match="empty"):
        validate_image(str(empty), DemoLimits())
    with pytest.raises(DemoInputError, match="was not received"):
        validate_image(str(tmp_path / "missing.png"), DemoLimits())
    with pytest.raises(DemoInputError, match="No image"):
        validate_image(None, DemoLimits())


def test_limits_are_validated():
    with pytest.raises(ValueError, match="DemoLimits.max_new_tokens"):
        DemoLimits(max_new_tokens=0)
    with pytest.raises(ValueError, match="default_new_tokens=64 exceeds max_new_tokens=8"):
        DemoLimits(max_new_tokens=8, default_new_tokens=64)


def test_load_examples_reads_ground_truth(example_dir):
    examples = load_examples(example_dir)
    assert [e.name for e in examples] == ["scene_0", "scene_1"]
    assert examples[0].objects == list(dict.fromkeys(o.type for o in World(seed=0).scene(0).objects))
    assert load_examples(example_dir / "nowhere") == []


# ---------------------------------------------------------------------------- handlers (the UI path)
def _assert_cleared(result_panels):
    """The result panels of a refusal: no run, no answer, no picture (nothing stale beside the message)."""
    run, plain_header, plain_answer, guarded_header, guarded_answer, which, token, heatmap, info, saliency = (
        result_panels
    )
    assert run is None and plain_answer == [] and guarded_answer == [] and heatmap is None and saliency is None
    assert " s · " not in plain_header and " s · " not in guarded_header
    assert token["interactive"] is False and token["minimum"] < token["maximum"]


def test_upload_handler_reports_corrupt_file_in_status(session, corrupt_png):
    outputs = DemoHandlers(session).on_upload(str(corrupt_png))
    image_path, preview, truth, *panels, status, upload_box = outputs
    assert image_path is None and preview is None and upload_box is None
    assert status.startswith("**Upload refused:**") and "broken.png" in status and "not a readable image" in status
    _assert_cleared(panels)


def test_generate_handler_refuses_bad_input_with_one_message_and_clears_results(session, corrupt_png, tmp_path):
    """Issue 17 item 9: a refusal is one status message and empty panels, not gr.Error (which puts a red error
    badge on every output beside the previous answers)."""
    handlers = DemoHandlers(session)
    methods = (True, 2.0) + (False, 0.5) * 4
    big = tmp_path / "big.png"
    Image.effect_noise((400, 400), 80).convert("RGB").save(big)
    cases = [
        (str(corrupt_png), 4, "not a readable image"),
        (str(big), 4, "accepts images up to"),
        (None, 4, "No image"),
        (str(session.examples[0].path), 99, "max new tokens=99 is out of range"),
    ]
    for image, tokens, expected in cases:
        *panels, status = handlers.on_generate(image, "describe the image", tokens, *methods)
        assert status.startswith("**Input refused:**") and expected in status and "Traceback" not in status
        _assert_cleared(panels)
    *panels, status = handlers.on_generate(
        str(session.examples[0].path), "describe the image", 4, True, 50.0, *(False, 0.5) * 4
    )
    assert status.startswith("**Settings refused:**") and "VHRConfig.alpha" in status
    _assert_cleared(panels)


def test_generate_handler_returns_both_answers_and_a_heatmap(session):
    handlers = DemoHandlers(session)
    path, preview, truth, *panels, status, upload_box = handlers.pick_example(0)
    assert upload_box is None
    assert "Ground-truth objects" in truth and preview is not None
    _assert_cleared(panels)  # a new image: the previous answers are gone
    methods = (True, 2.0) + (False, 0.5) * 4
    outputs = handlers.on_generate(path, "describe the image", 5, *methods)
    run, plain_header, plain_answer, guarded_header, guarded_answer, _, _, heatmap, info, saliency, status = outputs
    assert "Plain model" in plain_header and " s · " in plain_header
    assert "Guarded (VHR)" in guarded_header
    assert "".join(piece for piece, _ in plain_answer) == run.plain.text
    assert isinstance(heatmap, Image.Image) and isinstance(saliency, Image.Image)
    assert status.startswith("**Done.**") and "Ground truth" in status
    heatmap, info = handlers.on_token(run, "plain", 2, "layer 1")
    assert "layer 1" in info and heatmap.size == (run.image.size[0] + SCALE_WIDTH, run.image.size[1])


# ---------------------------------------------------------------------------- session
def test_plain_and_guarded_runs_collect_per_token_attention(session, example_dir):
    run = session.run(str(example_dir / "scene_0.png"), "describe the image", {"vhr": 2.0}, max_new_tokens=6)
    grid = run.grid
    assert grid == ImageGrid(4, 4)
    for result in (run.plain, run.guarded):
        assert 0 < result.num_tokens <= 6 and result.seconds > 0
        assert "".join(result.pieces) == result.text
        assert result.attention.shape == (result.num_tokens, SPEC.text_layers, 16)
        assert np.all(result.attention >= 0) and np.all(result.attention.sum(-1) <= 1 + 1e-5)
    assert run.guarded.methods == ["vhr"] and run.plain.methods == []
    assert run.ground_truth is not None


def test_live_recording_matches_teacher_forced_recording(session, example_dir):
    """With no method on, the guarded run is the plain model: its live-recorded rows must equal the
    plain run's teacher-forced rows token by token (checks the row/token alignment of both paths)."""
    run = session.run(str(example_dir / "scene_1.png"), "describe the image", {}, max_new_tokens=6)
    assert run.guarded.token_ids == run.plain.token_ids
    assert_close_scaled(run.guarded.attention, run.plain.attention, reduction=forward_reduction(session.model))
    assert any("No method is switched on" in note for note in run.notes)


def test_gift_saliency_is_exposed_and_drawn(session, example_dir):
    if not session.availability["gift"].available:
        pytest.skip(f"GIFT not available: {session.availability['gift'].note}")
    run = session.run(str(example_dir / "scene_0.png"), "describe the image", {"gift": 5.0}, max_new_tokens=4)
    assert run.guarded.saliency is not None and run.guarded.saliency.shape == (16,)
    picture = session.saliency_view(run)
    assert picture.size == (run.image.size[0] + SCALE_WIDTH, run.image.size[1])  # with its colour scale
    plain_run_view = session.saliency_view(run.__class__(**{**run.__dict__, "guarded": run.plain}))
    assert plain_run_view.size[0] > 0  # placeholder, not an error


def test_token_view_marks_var_sinks(session, example_dir):
    run = session.run(str(example_dir / "scene_0.png"), "describe the image", {}, max_new_tokens=3)
    sinks = np.zeros(16, dtype=bool)
    sinks[[0, 5]] = True
    run.guarded.sink_mask = {2: sinks}
    run.guarded.methods = ["var"]
    picture, info = session.token_view(run, "guarded", 0, 2)
    assert "VAR's visual sink tokens (2 cells)" in info
    picture_mean, info_mean = session.token_view(run, "guarded", 0, None)
    assert "mean over layers" in info_mean and "2 cells" in info_mean
    cyan = np.all(np.asarray(picture) == (0, 255, 255), axis=-1)
    assert cyan.any()


def test_build_guard_config_maps_strengths_and_reports_missing():
    config, notes = build_guard_config({"vhr": 3.0, "gift": None})
    assert config.enabled_methods == ["vhr"] and config.vhr.alpha == 3.0
    with pytest.raises(ValueError, match="VHRConfig.alpha"):
        build_guard_config({"vhr": 50.0})


def test_highlighting_labels_flagged_and_grounded_words():
    result = GenerationResult(
        "plain", "a red house , a green tree .", [], ["a", " red", " house", " ,", " a", " green", " tree", " ."], 0.1
    )
    result.token_ids = list(range(len(result.pieces)))
    result.mentions = FakeChecker().check(None, result.text)
    assert [tokens for _, tokens in mention_tokens(result)] == [[2], [6]]
    labels = dict(enumerate(label for _, label in highlighted(result)))
    assert labels[2] == LABEL_GROUNDED and labels[6] == LABEL_FLAGGED and labels[0] == LABEL_WORD
    result.tvhd = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.1, 1.0])
    assert highlighted(result)[6][1] == LABEL_FLAGGED  # the checker's verdict wins over low T-VHD


# ---------------------------------------------------------------------------- pictures
def test_overlay_and_head_map_figure_render():
    image = Image.new("RGB", (64, 64), (30, 30, 30))
    values = np.arange(16, dtype=np.float32).reshape(4, 4)
    picture = heatmap_overlay(image, values)
    assert picture.size == (64, 64) and np.asarray(picture).std() > 0
    assert square_grid(576) == ImageGrid(24, 24) and square_grid(10) is None
    with pytest.raises(ValueError, match=r"\[rows, cols\]"):
        heatmap_overlay(image, values.flatten())
    figure = head_map_figure(np.random.default_rng(0).random((6, 4)), selected=np.eye(6, 4, dtype=bool))
    assert figure.size[0] > 200 and figure.size[1] > 150


def test_head_map_view_without_head_map_says_how_to_get_one(session):
    picture, text = session.head_map_view()
    assert picture is None and "vlm-guard calibrate" in text


# ---------------------------------------------------------------------------- app and CLI
def test_build_app_wires_a_queue(session):
    demo = build_app(session)
    assert isinstance(demo, gr.Blocks)
    assert demo._queue.max_size == session.limits.queue_size
    options = launch_options(session.limits)
    assert options["max_file_size"] == session.limits.max_upload_bytes and options["share"] is False


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1", True),
        ("localhost", True),
        ("::1", True),
        ("127.0.0.2", True),
        ("0.0.0.0", False),
        ("192.168.1.5", False),
        ("example.org", False),
    ],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_non_loopback_host_needs_explicit_flag(capsys):
    from vlm_guard.cli import UserError, main

    with pytest.raises(UserError, match="--share-on-network"):
        check_host("0.0.0.0", share_on_network=False)
    check_host("0.0.0.0", share_on_network=True)
    check_host("127.0.0.1", share_on_network=False)
    assert main(["demo", "--host", "0.0.0.0"]) == 2
    assert "would expose the demo to other machines" in capsys.readouterr().err


def test_word_click_and_answer_switch_handlers(session, example_dir):
    handlers = DemoHandlers(session)
    run = session.run(str(example_dir / "scene_0.png"), "describe the image", {"vhr": 2.0}, max_new_tokens=4)
    click = gr.SelectData(None, {"index": 2, "value": [run.plain.pieces[2], None], "selected": True})
    which, token, heatmap, info = handlers.on_word_click("plain", run, "mean over layers", click)
    assert which["value"] == "plain" and token["value"] == 2 and "token 3/" in info
    token, heatmap, info = handlers.on_answer(run, "guarded", "layer 0")
    assert token["maximum"] == run.guarded.num_tokens - 1 and "layer 0" in info
    heatmap, info = handlers.on_token(None, "plain", 0, None)
    assert "Generate" in info


def test_empty_answer_is_shown_not_crashed(session, example_dir):
    run = session.run(str(example_dir / "scene_0.png"), "describe the image", {}, max_new_tokens=2)
    run.plain = GenerationResult("plain", "", [], [], 0.01)
    picture, info = session.token_view(run, "plain", 0, None)
    assert "empty" in info and picture.size[0] > 0
    assert highlighted(run.plain) == []


def test_missing_default_model_is_a_clear_cli_error(monkeypatch, tmp_path, capsys):
    import vlm_guard.defaults
    from vlm_guard.cli import main

    monkeypatch.setattr(vlm_guard.defaults, "FIXTURE_MODEL_DIR", tmp_path / "no_model")
    assert main(["demo", "--port", "7999", "--no-checker"]) == 2
    assert "no test fixture in" in capsys.readouterr().err


# ---------------------------------------------------------------------------- issue 17: the demo under load
def _event(demo, api_name):
    return next(fn for fn in demo.fns.values() if fn.api_name == api_name)


def _process(demo, api_name, inputs, state):
    """One event through Gradio's own pre/post-processing (what a browser request runs), without a server."""
    import asyncio

    return asyncio.run(demo.process_api(block_fn=_event(demo, api_name), inputs=inputs, state=state))


def test_one_token_answer_reaches_the_page(session):
    """Item 6: a one-token answer (max 1 new token, like every yes/no answer) used to fail in Gradio's
    postprocessing with "Slider minimum must be less than maximum" and the answer was lost."""
    from gradio.state_holder import SessionState

    demo = build_app(session)
    generate = _event(demo, "on_generate")
    state = SessionState(demo)
    state[generate.inputs[0]._id] = str(session.examples[0].path)  # the image chosen earlier in this session
    methods = [True, 2.0] + [False, 0.5] * 4
    output = _process(demo, "on_generate", [None, "is there a house ?", 1, *methods], state)["data"]
    plain_answer, guarded_answer, token_slider, status = output[2], output[4], output[6], output[10]
    assert status.startswith("**Done.**")
    assert len(plain_answer) == 1 and len(guarded_answer) == 1
    assert token_slider["interactive"] is False and token_slider["value"] == 0
    # a refusal empties the panels through the same slider rule (no answer at all)
    state[generate.inputs[0]._id] = None
    output = _process(demo, "on_generate", [None, "is there a house ?", 1, *methods], state)["data"]
    assert output[10].startswith("**Input refused:** No image") and output[2] == [] and output[4] == []


def test_append_tokens_extends_every_per_token_input():
    """Item 7's kind: every per-token input grows with the appended tokens, as generate grows it."""
    from vlm_guard.models.inputs import append_tokens

    inputs = {
        "input_ids": torch.tensor([[0, 5, 6], [7, 8, 9]]),
        "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
        "mm_token_type_ids": torch.tensor([[0, 1, 0], [1, 1, 0]]),
        "token_type_ids": torch.tensor([[0, 0, 1], [0, 1, 2]]),
        "position_ids": torch.tensor([[[0, 0, 1], [0, 1, 2]]] * 3),  # [3, B, S] (M-RoPE layout)
        "pixel_values": torch.zeros(2, 3, 4, 4),
        "image_grid_thw": torch.tensor([[1, 2, 3], [1, 2, 3]]),
    }
    out = append_tokens(inputs, torch.tensor([[11, 12], [13, 14]]))
    assert out["input_ids"].tolist() == [[0, 5, 6, 11, 12], [7, 8, 9, 13, 14]]
    assert out["attention_mask"].tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert out["mm_token_type_ids"].tolist() == [[0, 1, 0, 0, 0], [1, 1, 0, 0, 0]]  # new tokens are text
    assert out["token_type_ids"].tolist() == [[0, 0, 1, 1, 1], [0, 1, 2, 2, 2]]  # last value repeated
    assert (
        out["position_ids"][:, 0].tolist() == [[0, 0, 1, 2, 3]] * 3
        and out["position_ids"][:, 1].tolist() == [[0, 1, 2, 3, 4]] * 3
    )
    assert out["pixel_values"] is inputs["pixel_values"] and out["image_grid_thw"] is inputs["image_grid_thw"]
    assert inputs["input_ids"].shape == (2, 3)  # not modified in place
    with pytest.raises(ValueError, match=r"cannot append tokens to the model input 'segment_ids' \(shape \(2, 3\)"):
        append_tokens({**inputs, "segment_ids": torch.zeros(2, 3, dtype=torch.long)}, torch.tensor([[1], [2]]))
    with pytest.raises(ValueError, match=r"new_ids must be \[batch=2, T\], got shape \(3,\)"):
        append_tokens(inputs, torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_demo_runs_qwen_families(family):
    """Item 7 / issue 15: Qwen2-VL and Qwen2.5-VL crashed on every Generate (the plain run's teacher-forced pass
    grew input_ids but not mm_token_type_ids). With no method on, the live recording of the guarded run must
    equal the plain run's teacher-forced one: the appended tokens got the right positions."""
    from tiny_processors import tiny_processor

    from vlm_guard.testing import tiny_model

    model = tiny_model(family)
    limits = DemoLimits(max_new_tokens=8, default_new_tokens=5)
    demo_session = DemoSession(
        model, tiny_processor(family), checker=None, limits=limits, examples=[], model_name=family
    )
    image = Image.effect_noise((48, 40), 60).convert("RGB")
    run = demo_session.run(image, "describe the image", {}, max_new_tokens=5)
    assert run.guarded.token_ids == run.plain.token_ids and run.plain.num_tokens == 5
    assert run.grid is not None and run.plain.attention.shape == (5, 4, run.grid.size)
    assert_close_scaled(run.guarded.attention, run.plain.attention, reduction=forward_reduction(model))
    assert run.plain.tvhd is not None and run.plain.tvhd.shape == (5,)
    guarded = demo_session.run(image, "describe the image", {"vhr": 2.0}, max_new_tokens=5)
    assert guarded.guarded.methods == ["vhr"] and guarded.guarded.num_tokens == 5
    picture, info = demo_session.token_view(guarded, "plain", 4, None)
    assert "token 5/5" in info and picture.size[0] == guarded.image.size[0] + SCALE_WIDTH


def test_sessions_and_their_runs_are_bounded(session):
    """Item 8: at most limits.max_sessions sessions are kept, and a session's run and image expire after
    limits.session_ttl_seconds (Gradio's own state holder, as the server runs it)."""
    import dataclasses

    from gradio.state_holder import StateHolder

    limits = dataclasses.replace(session.limits, max_sessions=3, session_ttl_seconds=1)
    processor = build_processor(SPEC)
    bounded = DemoSession(
        build_model(SPEC, processor.tokenizer, seed=0).eval(),
        processor,
        checker=None,
        limits=limits,
        examples=session.examples,
    )
    demo = build_app(bounded)
    options = launch_options(limits)
    assert options["state_session_capacity"] == 3 and demo.delete_cache == (1, 1)
    demo.state_session_capacity = options["state_session_capacity"]  # what launch() does with the option
    holder = StateHolder()
    holder.set_blocks(demo)
    generate = _event(demo, "on_generate")
    image_state, run_state = generate.inputs[0], generate.outputs[0]
    methods = [value for control in METHOD_CONTROLS for value in (False, control.fallback)]
    for number in range(5):
        state = holder[f"session-{number}"]
        state[image_state._id] = str(session.examples[0].path)
        output = _process(demo, "on_generate", [None, "describe the image", 2, *methods], state)
        assert output["data"][10].startswith("**Done.**")
    assert list(holder.session_data) == ["session-2", "session-3", "session-4"]
    assert all(run_state._id in holder.session_data[key].state_data for key in holder.session_data)
    time.sleep(1.2)
    holder.delete_all_expired_state()
    for key in holder.session_data:
        assert (
            run_state._id not in holder.session_data[key].state_data
            and image_state._id not in holder.session_data[key].state_data
        )


def test_refused_upload_is_deleted_and_other_files_are_not(session, tmp_path, monkeypatch, corrupt_png):
    """Item 8: a refused upload is deleted from the app's upload folder at once; files elsewhere never are."""
    upload_folder = tmp_path / "uploads"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(upload_folder))
    received = upload_folder / "0123abcd" / "broken.png"
    received.parent.mkdir(parents=True)
    received.write_bytes(corrupt_png.read_bytes())
    handlers = DemoHandlers(session)
    *_, status, _ = handlers.on_upload(str(received))
    assert status.startswith("**Upload refused:**")
    assert not received.exists() and not received.parent.exists() and upload_folder.exists()
    *_, status, _ = handlers.on_upload(str(corrupt_png))  # outside the upload folder: refused but left alone
    assert status.startswith("**Upload refused:**") and corrupt_png.exists()


def test_owned_temp_dir_is_set_for_gradio_and_removed(tmp_path, monkeypatch):
    from vlm_guard.demo.tempfiles import owned_temp_dir

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "outer"))
    with owned_temp_dir() as folder:
        assert gr.utils.get_upload_folder() == str(folder) and folder.parent == (tmp_path / "outer").resolve()
        (folder / "upload").mkdir()
        (folder / "upload" / "picture.png").write_bytes(b"x")
    assert not folder.exists()
    assert gr.utils.get_upload_folder() == str(tmp_path / "outer")


def test_heatmaps_carry_a_colour_scale():
    """Item 9: the heatmap shows what its colours mean (the map's real minimum and maximum)."""
    from matplotlib import colormaps

    image = Image.new("RGB", (64, 64), (128, 128, 128))
    values = np.array([[0.01, 0.02], [0.03, 0.10]], dtype=np.float32)
    picture = heatmap_overlay(image, values, scale_title="attention", scale_format="{:.1%}")
    assert picture.size == (64 + SCALE_WIDTH, 64)
    assert np.asarray(picture.crop((0, 0, 64, 64))).tolist() == np.asarray(heatmap_overlay(image, values)).tolist()
    scale = np.asarray(colour_scale(0.01, 0.10, 200, "inferno", "attention"))
    bar = scale[29:185, 17].astype(float)  # inside the outline: the bar's middle column, top (max) to bottom (min)
    top, bottom = (np.array(colormaps["inferno"](f)[:3]) * 255 for f in (1.0, 0.0))
    assert np.abs(bar[0] - top).max() <= 6 and np.abs(bar[-1] - bottom).max() <= 6  # one row off the ends
    labels = scale[:, 30:]
    assert (labels < 100).any()  # tick labels are drawn


@pytest.mark.slow
def test_app_sweeps_its_temporary_files(tmp_path, monkeypatch, session):
    """Item 8: uploads and served pictures do not stay in the temporary folder forever: files older than the
    session lifetime are deleted while the app runs (the page's own startup files stay), and the folder goes
    with the server."""
    import socket

    gradio_client = pytest.importorskip("gradio_client")
    from vlm_guard.demo.tempfiles import owned_temp_dir

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    upload = tmp_path / "noise_upload.png"
    Image.effect_noise((40, 40), 90).convert("RGB").save(upload)
    with owned_temp_dir() as folder:
        limits = DemoLimits(
            max_upload_bytes=200_000,
            max_image_pixels=512 * 512,
            max_new_tokens=4,
            default_new_tokens=2,
            session_ttl_seconds=6,
        )  # long enough for the upload to reach the handler on a busy CPU
        processor = build_processor(SPEC)
        app_session = DemoSession(
            build_model(SPEC, processor.tokenizer, seed=0).eval(),
            processor,
            checker=None,
            limits=limits,
            examples=session.examples,
        )
        demo = build_app(app_session)
        demo.launch(
            server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_options(limits)
        )
        try:
            startup_files = {p for p in folder.rglob("*") if p.is_file()}
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
                page = response.read()
            # item 9: the page served loads nothing from another host (Gradio's template has a CDN script and font preconnects)
            assert b"cdnjs" not in page and b"fonts.googleapis" not in page and b"fonts.gstatic" not in page
            assert b'<script type="module"' in page  # the app's own scripts stay
            client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
            assert client.predict(gradio_client.handle_file(str(upload)), api_name="/on_upload")[-2].startswith(
                "Image ready"
            )
            methods = [value for control in METHOD_CONTROLS for value in (False, control.fallback)]
            assert client.predict("describe the image", 2, *methods, api_name="/on_generate")[-1].startswith(
                "**Done.**"
            )
            made = {p for p in folder.rglob("*") if p.is_file()} - startup_files
            assert any(p.name == upload.name for p in made) and len(made) >= 3  # the upload and the pictures served
            deadline = time.monotonic() + 40
            while any(p.exists() for p in made if not p.name.startswith("tmp")) and time.monotonic() < deadline:
                time.sleep(0.5)
            # Gradio's File component leaves an empty tmp* file per upload; the next upload sweeps old ones
            second = tmp_path / "second_upload.png"
            Image.effect_noise((40, 40), 30).convert("RGB").save(second)
            assert client.predict(gradio_client.handle_file(str(second)), api_name="/on_upload")[-2].startswith(
                "Image ready"
            )
            assert not [p for p in made if p.exists()], "files older than the session lifetime were not deleted"
            assert all(p.exists() for p in startup_files)  # the gallery's pictures are kept
        finally:
            demo.close()
    assert not folder.exists()


def test_offline_page_strips_tags_that_load_from_other_hosts():
    from pathlib import Path

    from vlm_guard.demo.offline import strip_external_tags

    template = (Path(gr.__file__).parent / "templates" / "frontend" / "index.html").read_bytes()
    assert b"cdnjs.cloudflare.com" in template and b"fonts.googleapis.com" in template  # what Gradio ships
    page = strip_external_tags(template)
    assert b"cdnjs" not in page and b"fonts.googleapis" not in page and b"fonts.gstatic" not in page
    assert b"./assets/index-" in page and b"window.gradio_config" in page
    html = b'<head><script src="//cdn.example.org/x.js"></script><link rel="stylesheet" href="/local.css"><script>1</script></head>'
    assert strip_external_tags(html) == b'<head><link rel="stylesheet" href="/local.css"><script>1</script></head>'
