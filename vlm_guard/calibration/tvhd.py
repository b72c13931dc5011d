"""T-VHD: token-level vision-aware head divergence (He et al., ACL 2025, analysis section).

For generated token t, ``T-VHD[t] = sum_l topk_h VHD[l, h, t]``, where ``VHD[l, h, t]`` is the distance
between head h's output (before ``o_proj``) at the position that emits token t, with the image and
with the image span deleted. A low score marks a token produced with little help from the image (a
hallucination candidate); the demo and reports colour tokens by it.

Computed by two teacher-forced forwards over ``prompt + generated[:-1]`` (with and without the image
span), reading the last T positions: position ``S - 1 + t`` emits generated token t. The image-free
pass runs first and keeps ``[B, T, H, D]`` per layer; the image pass turns each layer into ``[B, T]``
on the fly.

``top_k`` default: 4 heads per layer (capped at H), a project choice; methods.md does not restate the
paper's k.

Example (not run: needs a wrapped model and its inputs; :func:`token_vhd`'s own example runs)::

    output_ids = guarded.generate(**inputs, max_new_tokens=32, do_sample=False)
    scores = token_vhd(guarded, processor, inputs, output_ids)  # [B, 32]
"""

from __future__ import annotations

import torch

from vlm_guard.calibration.session import profiling_session
from vlm_guard.core.contract import Intervention, LayerContext
from vlm_guard.methods.vhr.vhd import DISTANCES, head_divergence
from vlm_guard.models.inputs import append_tokens

DEFAULT_TOP_K = 4


class _LastPositionsRecorder(Intervention):
    """Keeps per-head outputs ``[B, T, H, D]`` (fp32) of the last T positions of a prefill, per layer."""

    name = "last_positions_recorder"
    needs_image = False
    uses_head_output = True

    def __init__(self, layers: list[int], positions: int):
        self._layers = set(layers)
        self.positions = positions
        self.outputs: dict[int, torch.Tensor] = {}

    def layers(self) -> set[int]:
        return self._layers

    def on_head_output(self, ctx: LayerContext, head_output: torch.Tensor) -> torch.Tensor:
        if ctx.phase == "prefill":
            self.outputs[ctx.layer] = head_output[:, -self.positions :].detach().float()
        return head_output


class _TokenVHDObserver(Intervention):
    """During the image pass: per layer, VHD of the last T positions against the image-free outputs,
    top-k over heads, summed into ``scores`` ``[B, T]``."""

    name = "token_vhd_observer"
    needs_image = False
    uses_head_output = True

    def __init__(self, reference: dict[int, torch.Tensor], positions: int, top_k: int, distance: str):
        self.reference = reference
        self.positions = positions
        self.top_k = top_k
        self.distance = distance
        self.scores: torch.Tensor | None = None
        self.layers_seen: set[int] = set()

    def layers(self) -> set[int]:
        return set(self.reference)

    def on_head_output(self, ctx: LayerContext, head_output: torch.Tensor) -> torch.Tensor:
        if ctx.phase != "prefill":
            return head_output
        with_image = head_output[:, -self.positions :]  # [B, T, H, D]
        vhd = head_divergence(with_image, self.reference[ctx.layer].to(with_image.device), self.distance)  # [B, T, H]
        top = vhd.topk(min(self.top_k, vhd.shape[-1]), dim=-1).values.sum(dim=-1)  # [B, T]
        self.scores = top if self.scores is None else self.scores + top
        self.layers_seen.add(ctx.layer)
        return head_output


def token_vhd(
    guarded_or_model,
    processor,
    inputs: dict,
    generated_ids: torch.Tensor,
    top_k: int = DEFAULT_TOP_K,
    distance: str = "sq_l2",
    layers: list[int] | None = None,
    with_interventions: bool = False,
) -> torch.Tensor:
    """T-VHD of each generated token.

    Args:
        guarded_or_model: a :class:`vlm_guard.GuardedModel` or a plain supported VLM.
        processor: its processor (may be None for models whose config names the image token).
        inputs: the prompt batch given to ``generate`` (left padded; ``input_ids``, ``attention_mask``,
            image tensors).
        generated_ids: ``[B, T]`` generated tokens, or the whole ``generate`` output ``[B, S + T]``
            (recognised by its first S columns equal to ``inputs["input_ids"]``).
        top_k: heads summed per layer (capped at H).
        distance: ``"sq_l2"`` (released), ``"l2"`` or ``"cosine"``.
        layers: layers to sum over (default all).
        with_interventions: for a GuardedModel, run its methods in both passes (default: the plain
            model, so scores of different methods' outputs are comparable).
    Returns:
        ``[B, T]`` fp32 on CPU. Positions after a row's end-of-sequence token are scored too.

    Example:
        >>> from PIL import Image
        >>> from vlm_guard.defaults import load_fixture
        >>> from vlm_guard.models.loading import chat_prompt
        >>> model, processor = load_fixture()                          # the 3.6M test fixture
        >>> prompt = chat_prompt(processor, "describe the image")
        >>> inputs = processor(images=Image.new("RGB", (32, 32), "red"), text=prompt, return_tensors="pt")
        >>> output_ids = processor.tokenizer("a red house", add_special_tokens=False, return_tensors="pt").input_ids
        >>> scores = token_vhd(model, processor, inputs, output_ids, top_k=4)
        >>> scores.shape, scores.dtype                                 # one score per given token
        (torch.Size([1, 3]), torch.float32)
    """
    if distance not in DISTANCES:
        raise ValueError(f"distance={distance!r} is not known; choose one of {list(DISTANCES)}")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k={top_k!r} must be a positive integer")
    prompt_ids = inputs["input_ids"]
    batch, prompt_length = prompt_ids.shape
    if generated_ids.ndim != 2 or generated_ids.shape[0] != batch:
        raise ValueError(f"generated_ids must be [batch={batch}, T], got shape {tuple(generated_ids.shape)}")
    generated = generated_ids.to(prompt_ids.device)
    if generated.shape[1] >= prompt_length and torch.equal(generated[:, :prompt_length], prompt_ids):
        generated = generated[:, prompt_length:]
    steps = generated.shape[1]
    if steps == 0:
        return torch.zeros(batch, 0)
    attention_mask = inputs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(prompt_ids)
    forced = generated[:, :-1]  # the last generated token emits nothing we score

    with profiling_session(guarded_or_model, processor) as session:
        adapter = session.adapter
        num_layers = adapter.geometry.num_layers
        layers = list(range(num_layers)) if layers is None else sorted(set(layers))
        bad = [layer for layer in layers if not 0 <= layer < num_layers]
        if bad:
            raise ValueError(f"layers {bad} are out of range; the model has layers 0..{num_layers - 1}")
        methods = session.guard_interventions if with_interventions else []

        # image-free pass
        text_ids, text_mask = adapter.remove_image(prompt_ids, attention_mask)
        text_inputs = {
            "input_ids": torch.cat([text_ids, forced], dim=1),
            "attention_mask": torch.cat([text_mask, torch.ones_like(forced, dtype=text_mask.dtype)], dim=1),
        }
        recorder = _LastPositionsRecorder(layers, steps)
        session.forward(session.to_model(text_inputs), [*methods, recorder])

        # image pass
        image_inputs = append_tokens(
            {**inputs, "attention_mask": attention_mask}, forced
        )  # e.g. mm_token_type_ids grows too
        observer = _TokenVHDObserver(recorder.outputs, steps, top_k, distance)
        session.forward(session.to_model(image_inputs), [*methods, observer])
    if observer.scores is None or observer.layers_seen != set(layers):
        raise RuntimeError(
            f"T-VHD saw layers {sorted(observer.layers_seen)} of {layers}; the engine did not reach every layer"
        )
    return observer.scores.cpu()
