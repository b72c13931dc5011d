"""The Gradio Blocks app: plain vs guarded answers side by side, per-token attention heatmaps, VAR's
sinks, GIFT's saliency, risky words highlighted, and the head map.

The handlers live in :class:`DemoHandlers` (plain methods, callable from tests without a browser);
:func:`build_app` only lays out the components and wires the events. Errors reach the user as
``gr.Error`` / ``gr.Warning`` messages or in the status line, never as tracebacks.

Example (not run: loads the default model and starts a web server)::

    from vlm_guard.demo.session import DemoSession
    from vlm_guard.demo.app import build_app, launch_options
    session = DemoSession.load()
    demo = build_app(session)
    demo.launch(server_name="127.0.0.1", server_port=7860, **launch_options(session.limits))
"""

from __future__ import annotations

import logging
from typing import Any

import gradio as gr
from starlette.middleware import Middleware

from vlm_guard.demo.inputs import DemoInputError, DemoLimits, validate_image
from vlm_guard.demo.offline import OfflinePage
from vlm_guard.demo.session import (
    HIGHLIGHT_COLOURS,
    LABEL_FLAGGED,
    LABEL_GROUNDED,
    LABEL_LOW_TVHD,
    METHOD_CONTROLS,
    DemoRun,
    DemoSession,
    highlighted,
)
from vlm_guard.demo.tempfiles import STRAY_AGE_SECONDS, discard_upload, sweep_stray_files

logger = logging.getLogger(__name__)

MEAN_OVER_LAYERS = "mean over layers"
ANSWERS = ("guarded", "plain")

CSS = """
#run-status p { margin: 0.2em 0; }
.vlm-guard-answer { min-height: 6em; }
.vlm-guard-answer .textfield .token { cursor: pointer; }
.vlm-guard-swatch { padding: 0 0.35em; border-radius: 3px; }
#examples-gallery .caption-label { white-space: normal; overflow: visible; max-width: none;
                                   left: var(--block-label-margin); text-overflow: clip; }
"""

SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif")
SYSTEM_MONO_FONTS = ("ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "Liberation Mono", "monospace")
"""Fonts the browser already has: the default theme would fetch its fonts from an external host, and the
page must work offline (no request leaves the server it came from)."""

INTRO = (
    "# vlm-guard: plain vs guarded answers\n"
    "Pick an example or upload an image, choose methods, and compare what the plain and the guarded "
    "model say. Click any word of an answer (or move the token slider) to see where it looked in the image."
)

NO_RESULT = "Pick an example or upload an image, then press **Generate**."
GALLERY_COLUMNS = 3
"""Thumbnails per gallery row: wide enough for each example's short label (its objects) to show whole."""
RESULT_COUNT = 10
"""Outputs that show one run: run state, plain header/answer, guarded header/answer, answer radio, token
slider, heatmap, token info, saliency (see :meth:`DemoHandlers.cleared_result`)."""


def legend_html() -> str:
    """The colour legend of the answers (every word is clickable; colours mark the checker's verdicts)."""
    meaning = {
        LABEL_FLAGGED: "an object that is not in the image (a bundled example's ground truth, else the checker)",
        LABEL_LOW_TVHD: "the token leaned little on the image (low T-VHD)",
        LABEL_GROUNDED: "an object that is in the image",
    }
    items = " · ".join(
        f'<span class="vlm-guard-swatch" style="background:{HIGHLIGHT_COLOURS[label]}">{label}</span> {meaning[label]}'
        for label in (LABEL_FLAGGED, LABEL_LOW_TVHD, LABEL_GROUNDED)
    )
    return f"<div id='answer-legend-text'>Click any word to see its attention heatmap. Colours: {items}.</div>"


def token_slider(count: int, value: int = 0) -> dict:
    """The token slider's update for an answer of ``count`` tokens.

    Gradio refuses a slider whose minimum equals its maximum, so a one-token answer (every yes/no
    answer) or an empty one keeps the range 0..1, locked at 0.
    """
    if count > 1:
        return gr.update(
            minimum=0, maximum=count - 1, value=int(min(max(value, 0), count - 1)), step=1, interactive=True
        )
    return gr.update(minimum=0, maximum=1, value=0, step=1, interactive=False)


def startup_lines(session: DemoSession) -> list[str]:
    """The start line's Markdown bullets: which methods are on and why, and where every slider starts."""
    default_methods, default_reason = session.default_methods()
    on = ", ".join(name.upper() for name in default_methods) or "none"
    lines = [f"- Methods on at start: {on} ({default_reason})."]
    starts = []
    for control in METHOD_CONTROLS:
        if not session.availability[control.name].available:
            continue
        value, source = session.strength_default(control.name)
        starts.append(f"{control.label} {control.strength_field} {value:g} ({source})")
    if starts:
        lines.append("- Sliders start at: " + "; ".join(starts) + ".")
    return lines


def warnings_markdown(lines: list[str]) -> str:
    """The settings-warning box: one bullet per setting the tuning table measured as breaking the answers."""
    return "\n".join(f"- ⚠ {line}" for line in lines)


def _layer_choice(value: str | None) -> int | None:
    if not value or value == MEAN_OVER_LAYERS:
        return None
    return int(str(value).split()[-1])


def _method_title(run: DemoRun) -> str:
    return ", ".join(name.upper() for name in run.guarded.methods) or "no method on"


class DemoHandlers:
    """The event handlers of the app, bound to one :class:`DemoSession`.

    Each returns plain values (or ``gr.update`` objects) for its outputs and raises ``gr.Error`` with a
    readable message on bad input.
    """

    def __init__(self, session: DemoSession):
        self.session = session

    # ------------------------------------------------------------------ inputs
    def cleared_result(self, reason: str = "") -> tuple:
        """Empty result panels (no stale answer may stay beside a new image or a refusal).

        Returns:
            ``RESULT_COUNT`` values: ``(run, plain header, plain answer, guarded header, guarded answer,
            answer radio, token slider, heatmap, token info, saliency)``.
        """
        return (
            None,
            "### Plain model",
            [],
            "### Guarded",
            [],
            gr.update(value="guarded"),
            token_slider(0),
            None,
            reason,
            None,
        )

    def on_upload(self, path: str | None):
        """Validate an upload.

        Returns:
            ``(image path or None, preview, ground-truth text, *cleared_result(), status, upload box)``; a
            refused file is deleted from the server at once, leaves the upload box, and the status line says why.
        """
        upload_folder = gr.utils.get_upload_folder()
        sweep_stray_files(upload_folder, age=min(STRAY_AGE_SECONDS, self.session.limits.session_ttl_seconds))
        if path is None:
            return (None, None, "", *self.cleared_result(), NO_RESULT, gr.update())
        try:
            image = validate_image(path, self.session.limits)
        except DemoInputError as error:
            discard_upload(path, upload_folder)
            message = f"**Upload refused:** {error}"
            return (None, None, "", *self.cleared_result(), message, None)  # the refused file leaves the upload box too
        example = self.session.example_for(image)
        truth = self._truth_text(example) if example else "Uploaded image (no ground truth)."
        return (path, image, truth, *self.cleared_result(), "Image ready: press **Generate**.", gr.update())

    def on_example(self, evt: gr.SelectData):
        """A bundled example picked in the gallery. Returns like :meth:`on_upload` (the upload box is emptied:
        the example is the image now)."""
        index = evt.index if isinstance(evt.index, int) else evt.index[0]
        return self.pick_example(index)

    def pick_example(self, index: int):
        examples = self.session.examples
        if not 0 <= index < len(examples):
            raise gr.Error(f"No bundled example number {index}; there are {len(examples)}.")
        example = examples[index]
        try:
            image = validate_image(example.path, self.session.limits)
        except DemoInputError as error:
            return (None, None, "", *self.cleared_result(), f"**Example refused:** {error}", None)
        return (
            str(example.path),
            image,
            self._truth_text(example),
            *self.cleared_result(),
            f"Example **{example.name}** ready: press **Generate**.",
            None,
        )

    @staticmethod
    def _truth_text(example) -> str:
        objects = ", ".join(example.objects) if example.objects else "not listed"
        text = f"Bundled example **{example.name}**. Ground-truth objects: **{objects}**."
        if example.absent:
            text += f" Absent, though its usual partner is there (a biased model may invent it): **{', '.join(example.absent)}**."
        return text

    # ------------------------------------------------------------------ generation
    def on_settings(self, *method_values) -> str:
        """The methods changed: warn now about a setting the tuning table measured as breaking the answers."""
        return warnings_markdown(self.session.setting_warnings(self.settings(method_values)))

    def settings(self, method_values: tuple) -> dict[str, float | None]:
        """``(on_1, strength_1, on_2, strength_2, ...)`` in :data:`METHOD_CONTROLS` order -> ``{method: strength or None}``."""
        result = {}
        for index, control in enumerate(METHOD_CONTROLS):
            enabled, strength = method_values[2 * index], method_values[2 * index + 1]
            result[control.name] = float(strength) if enabled else None
        return result

    def on_generate(self, image_path: str | None, prompt: str, max_new_tokens, *method_values):
        """Run both generations.

        Returns:
            ``(run, plain header, plain highlighted answer, guarded header, guarded highlighted answer,
            answer radio update, token slider update, heatmap, token info, GIFT saliency, status)``.
            Bad input or a failed generation empties the result panels and says why in the status
            line (one message; no error badge on every panel beside a stale answer).
        """
        try:
            run = self.session.run(image_path, prompt, self.settings(method_values), max_new_tokens)
        except DemoInputError as error:
            return (*self.cleared_result(), f"**Input refused:** {error}")
        except ValueError as error:
            return (*self.cleared_result(), f"**Settings refused:** {error}")
        except Exception as error:  # never a traceback in the browser; the log has it
            logger.exception("generation failed")
            return (
                *self.cleared_result(),
                f"**Generation failed** ({type(error).__name__}: {error}). The server log has the details.",
            )
        which = "guarded"
        heatmap, info = self.session.token_view(run, which, 0, None)
        plain_header = f"### Plain model\n{run.plain.seconds:.2f} s · {run.plain.num_tokens} tokens"
        guarded_header = (
            f"### Guarded ({_method_title(run)})\n{run.guarded.seconds:.2f} s · {run.guarded.num_tokens} tokens "
            "(includes attention recording)"
        )
        status_lines = [
            f"**Done.** Plain {run.plain.seconds:.2f} s, guarded {run.guarded.seconds:.2f} s ({_method_title(run)})."
        ]
        if run.ground_truth is not None:
            status_lines.append(f"Ground truth: {', '.join(run.ground_truth) or 'not listed'}.")
        status_lines += [f"Note: {note}" for note in run.notes + run.plain.notes + run.guarded.notes]
        return (
            run,
            plain_header,
            highlighted(run.plain),
            guarded_header,
            highlighted(run.guarded),
            gr.update(value=which),
            token_slider(run.result(which).num_tokens),
            heatmap,
            info,
            self.session.saliency_view(run),
            "\n\n".join(status_lines),
        )

    # ------------------------------------------------------------------ token views
    def on_token(self, run: DemoRun | None, which: str, token_index, layer: str | None):
        """Redraw the heatmap for another token, answer or layer. Returns ``(heatmap, info)``."""
        if run is None:
            return None, "Generate an answer first."
        return self.session.token_view(run, which or "guarded", int(token_index or 0), _layer_choice(layer))

    def on_answer(self, run: DemoRun | None, which: str, layer: str | None):
        """Another answer picked: reset the token slider to its length and redraw."""
        if run is None:
            return gr.update(), None, "Generate an answer first."
        heatmap, info = self.session.token_view(run, which, 0, _layer_choice(layer))
        return token_slider(run.result(which).num_tokens), heatmap, info

    def on_word_click(self, which: str, run: DemoRun | None, layer: str | None, evt: gr.SelectData):
        """A word clicked in an answer: show its heatmap. Returns ``(answer radio, slider, heatmap, info)``."""
        if run is None:
            return gr.update(), gr.update(), None, "Generate an answer first."
        index = evt.index if isinstance(evt.index, int) else evt.index[0]
        heatmap, info = self.session.token_view(run, which, index, _layer_choice(layer))
        return gr.update(value=which), token_slider(run.result(which).num_tokens, index), heatmap, info


def launch_options(limits: DemoLimits) -> dict[str, Any]:
    """Keyword arguments for ``demo.launch`` that go with :func:`build_app`: upload cap, CSS, a theme with the
    browser's own fonts and a page without third-party tags (:mod:`.offline`: no request leaves the server),
    the session cap, no SSR, no share link."""
    return {
        "max_file_size": limits.max_upload_bytes,
        "css": CSS,
        "theme": gr.themes.Default(font=SYSTEM_FONTS, font_mono=SYSTEM_MONO_FONTS),
        "app_kwargs": {"middleware": [Middleware(OfflinePage)]},  # no CDN script, no font-host preconnect
        "state_session_capacity": limits.max_sessions,
        "ssr_mode": False,
        "share": False,
        "show_error": True,
        "footer_links": ["gradio"],
    }


def build_app(session: DemoSession) -> gr.Blocks:
    """The demo's Blocks app for ``session`` (call ``.launch(**launch_options(session.limits))`` on it).

    The queue is configured here: one generation at a time (the model is shared), at most
    ``limits.queue_size`` waiting. Memory and disk stay bounded: a session's run and image expire after
    ``limits.session_ttl_seconds``, at most ``limits.max_sessions`` sessions are kept (see
    :func:`launch_options`), and the app's temporary files older than the session lifetime are deleted
    while it runs (``vlm-guard demo`` also gives it a temporary folder of its own,
    :func:`vlm_guard.demo.tempfiles.owned_temp_dir`).
    """
    handlers = DemoHandlers(session)
    limits = session.limits
    layer_choices = [MEAN_OVER_LAYERS] + [f"layer {i}" for i in range(session.num_layers)]

    lifetime = limits.session_ttl_seconds
    sweep_every = max(1, min(60, lifetime // 2))
    with gr.Blocks(title="vlm-guard demo", analytics_enabled=False, delete_cache=(sweep_every, lifetime)) as demo:
        run_state = gr.State(None, time_to_live=lifetime)
        image_state = gr.State(None, time_to_live=lifetime)

        gr.Markdown(INTRO, elem_id="intro")
        head_map_text = "loaded" if session.head_map is not None else "none"
        startup = [
            f"**Model:** {session.model_name} · **head map:** {head_map_text} · "
            f"**caps:** {limits.max_upload_bytes // (1024 * 1024)} MB upload, {limits.max_image_pixels:,} pixels, "
            f"{limits.max_new_tokens} new tokens"
        ]
        startup += [f"- {note}" for note in session.notes]
        default_methods, _ = session.default_methods()
        strengths = {control.name: session.strength_default(control.name) for control in METHOD_CONTROLS}
        startup += startup_lines(session)
        gr.Markdown("\n".join(startup), elem_id="startup-notes")

        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                if session.examples:
                    gallery = gr.Gallery(
                        value=[(str(example.path), example.short_label) for example in session.examples],
                        label="Bundled examples (click one)",
                        columns=GALLERY_COLUMNS,
                        height="auto",
                        allow_preview=False,
                        interactive=False,
                        elem_id="examples-gallery",
                        object_fit="contain",
                    )
                else:
                    gallery = None
                    gr.Markdown("_No bundled examples in this installation: upload an image._")
                upload = gr.File(
                    label="...or upload an image", file_types=["image"], type="filepath", elem_id="image-upload"
                )
                preview = gr.Image(
                    label="Input image", type="pil", interactive=False, height=220, elem_id="input-preview"
                )
                truth = gr.Markdown("", elem_id="ground-truth")
                prompt = gr.Textbox(
                    value=session.default_prompt,
                    label="Prompt",
                    max_lines=3,
                    elem_id="prompt",
                    max_length=limits.max_prompt_chars,
                )
                with gr.Accordion("Methods", open=True):
                    method_inputs = []
                    for control in METHOD_CONTROLS:
                        status = session.availability[control.name]
                        with gr.Row():
                            checkbox = gr.Checkbox(
                                value=status.available and control.name in default_methods,
                                label=control.label,
                                interactive=status.available,
                                scale=1,
                                min_width=80,
                                elem_id=f"method-{control.name}",
                            )
                            slider = gr.Slider(
                                minimum=control.minimum,
                                maximum=control.maximum,
                                step=control.step,
                                value=min(max(strengths[control.name][0], control.minimum), control.maximum),
                                label=f"{control.label} {control.strength_field}",
                                info=status.note or f"{control.help}. Starts at: {strengths[control.name][1]}",
                                interactive=status.available,
                                scale=4,
                                elem_id=f"strength-{control.name}",
                            )
                        method_inputs += [checkbox, slider]
                settings_warning = gr.Markdown(
                    handlers.on_settings(*_start_values(session, default_methods, strengths)),
                    elem_id="settings-warning",
                )
                max_tokens = gr.Slider(
                    minimum=1,
                    maximum=limits.max_new_tokens,
                    step=1,
                    value=limits.default_new_tokens,
                    label="Max new tokens",
                    elem_id="max-new-tokens",
                )
                generate = gr.Button("Generate", variant="primary", elem_id="generate-btn")

            with gr.Column(scale=2, min_width=480):
                # the one message of a run (done, refused, failed) sits above the answers it is about
                status_md = gr.Markdown(NO_RESULT, elem_id="run-status")
                with gr.Row():
                    with gr.Column():
                        plain_header = gr.Markdown("### Plain model", elem_id="plain-header")
                        plain_answer = gr.HighlightedText(
                            label="Plain answer",
                            color_map=HIGHLIGHT_COLOURS,
                            combine_adjacent=False,
                            show_legend=False,
                            show_inline_category=False,
                            elem_id="plain-answer",
                            elem_classes=["vlm-guard-answer"],
                            interactive=False,
                        )
                    with gr.Column():
                        guarded_header = gr.Markdown("### Guarded", elem_id="guarded-header")
                        guarded_answer = gr.HighlightedText(
                            label="Guarded answer",
                            color_map=HIGHLIGHT_COLOURS,
                            combine_adjacent=False,
                            show_legend=False,
                            show_inline_category=False,
                            elem_id="guarded-answer",
                            elem_classes=["vlm-guard-answer"],
                            interactive=False,
                        )
                gr.HTML(legend_html(), elem_id="answer-legend")
                with gr.Row():
                    which = gr.Radio(
                        choices=list(ANSWERS), value="guarded", label="Answer", elem_id="which-answer", scale=1
                    )
                    token = gr.Slider(
                        minimum=0,
                        maximum=1,
                        step=1,
                        value=0,
                        label="Generated token",
                        interactive=False,
                        elem_id="token-slider",
                        scale=3,
                    )
                    layer = gr.Dropdown(
                        choices=layer_choices, value=MEAN_OVER_LAYERS, label="Layer", elem_id="layer", scale=1
                    )
                with gr.Row():
                    heatmap = gr.Image(
                        label="Attention to the image (cyan boxes: VAR sinks)",
                        type="pil",
                        interactive=False,
                        height=384,
                        elem_id="attention-heatmap",
                    )
                    saliency = gr.Image(
                        label="GIFT saliency", type="pil", interactive=False, height=384, elem_id="gift-saliency"
                    )
                token_info = gr.Markdown("", elem_id="token-info")

        with gr.Accordion("Head map", open=False):
            head_map_image, head_map_summary = session.head_map_view()
            if head_map_image is not None:
                gr.Image(
                    value=head_map_image,
                    label="VHD per head (layers x heads)",
                    type="pil",
                    interactive=False,
                    elem_id="head-map-plot",
                )
            gr.Markdown(head_map_summary, elem_id="head-map-summary")

        # ------------------------------------------------------------------ events
        result_outputs = [
            run_state,
            plain_header,
            plain_answer,
            guarded_header,
            guarded_answer,
            which,
            token,
            heatmap,
            token_info,
            saliency,
        ]
        assert len(result_outputs) == RESULT_COUNT  # the handlers' cleared_result() has one value per panel
        input_outputs = [image_state, preview, truth, *result_outputs, status_md]
        if gallery is not None:
            gallery.select(handlers.on_example, inputs=None, outputs=[*input_outputs, upload], concurrency_limit=4)
        upload.upload(handlers.on_upload, inputs=upload, outputs=[*input_outputs, upload], concurrency_limit=4)
        for component in method_inputs:
            component.change(
                handlers.on_settings,
                inputs=method_inputs,
                outputs=settings_warning,
                concurrency_limit=4,
                show_progress="hidden",
            )
        generate.click(
            handlers.on_generate,
            inputs=[image_state, prompt, max_tokens, *method_inputs],
            outputs=[*result_outputs, status_md],
            concurrency_limit=1,
            concurrency_id="generate",
        )
        token.change(
            handlers.on_token,
            inputs=[run_state, which, token, layer],
            outputs=[heatmap, token_info],
            trigger_mode="always_last",
            concurrency_limit=4,
            show_progress="hidden",
        )
        layer.change(
            handlers.on_token,
            inputs=[run_state, which, token, layer],
            outputs=[heatmap, token_info],
            concurrency_limit=4,
            show_progress="hidden",
        )
        which.input(
            handlers.on_answer,
            inputs=[run_state, which, layer],
            outputs=[token, heatmap, token_info],
            concurrency_limit=4,
            show_progress="hidden",
        )
        for answer_name, component in (("plain", plain_answer), ("guarded", guarded_answer)):
            component.select(
                _word_click(handlers, answer_name),
                inputs=[run_state, layer],
                outputs=[which, token, heatmap, token_info],
                concurrency_limit=4,
                show_progress="hidden",
            )

    demo.queue(max_size=limits.queue_size, default_concurrency_limit=1)
    return demo


def _start_values(session: DemoSession, default_methods: list[str], strengths: dict) -> list:
    """``(on_1, strength_1, ...)`` as the page starts."""
    values = []
    for control in METHOD_CONTROLS:
        available = session.availability[control.name].available
        values += [available and control.name in default_methods, strengths[control.name][0]]
    return values


def _word_click(handlers: DemoHandlers, which: str):
    def handler(run, layer, evt: gr.SelectData):
        return handlers.on_word_click(which, run, layer, evt)

    return handler
