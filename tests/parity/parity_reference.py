"""Reference implementations of the released code of each method, for the parity suite.

Written for this suite from the official code's semantics (GIFT, VAR "See What You Are Told", PAI, VCD)
and, for VHR (no official code available), from the paper and ``shared/methods.md``. They share none
of vlm_guard's code: every forward is a full eager recomputation of the whole sequence (no KV cache),
the attention of every row is materialised, batch 1, and each method edits the matrix the way its
released code does (loops over heads, explicit position ranges), as the official repositories do.

Parameters per preset are written out here (:data:`RELEASED`, :data:`PAPER`), independently of the
library's config defaults, so a wrong default fails the suite too.
"""

from __future__ import annotations

import contextlib
import math

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

NAME = "parity_reference_eager"

# settings of the released code / the paper, per method (the parity suite builds vlm_guard's configs
# from the preset name alone and checks that they behave like these)
RELEASED = {
    "vhr": dict(alpha=2.0, outlier_filter="released"),
    "var": dict(keep=0.6, rho=0.5, summ=0.2, last_layer=True, require_visual_sink=True),
    "gift": dict(alpha=5.0, beta=1.0, clamp_stds=3.0),
    "pai": dict(alpha=0.2, gamma=1.1, plausibility=0.1, first_layer=2),
    "vcd": dict(alpha=1.0, plausibility=0.1, noise_step=500, contrast_greedy=False),
}
PAPER = {
    "vhr": dict(alpha=2.0, outlier_filter="always"),
    "var": dict(keep=0.4, rho=0.5, summ=0.2, last_layer=False, require_visual_sink=False),
    "gift": dict(alpha=5.0, beta=1.0, clamp_stds=3.0),
    "pai": dict(alpha=0.2, gamma=1.1, plausibility=0.1, first_layer=2),
    "vcd": dict(alpha=1.0, plausibility=0.1, noise_step=500, contrast_greedy=True),
}
SETTINGS = {"released": RELEASED, "paper": PAPER}


class Edits:
    """Hooks of one reference forward (batch 1). ``prompt_length`` P: rows ``>= P`` are generated tokens."""

    def layer_input(self, layer: int, hidden: torch.Tensor) -> None:  # [1, T, M]
        pass

    def scores(self, layer: int, scores: torch.Tensor) -> torch.Tensor:  # [H, T, T] pre-softmax
        return scores

    def weights(self, layer: int, weights: torch.Tensor) -> torch.Tensor:  # [H, T, T] post-softmax
        return weights

    def head_output(self, layer: int, output: torch.Tensor) -> torch.Tensor:  # [H, T, D] before o_proj
        return output


class EagerHarness:
    """Full-sequence eager forwards of a LLaVA model with :class:`Edits` (no cache, fp32 attention)."""

    def __init__(self, model):
        self.model = model
        self.layers = model.model.language_model.layers
        self.edits = Edits()
        self.configs = {id(layer.self_attn.config): layer.self_attn.config for layer in self.layers}
        self.configs[id(model.model.language_model.config)] = model.model.language_model.config

    @contextlib.contextmanager
    def installed(self):
        AttentionInterface.register(NAME, self._attention)
        AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
        saved = [(config, config._attn_implementation) for config in self.configs.values()]
        hooks = [
            layer.register_forward_pre_hook(self._layer_hook(index), with_kwargs=True)
            for index, layer in enumerate(self.layers)
        ]
        for config, _ in saved:
            config._attn_implementation = NAME
        try:
            yield self
        finally:
            for hook in hooks:
                hook.remove()
            for config, value in saved:
                config._attn_implementation = value
            AttentionInterface._global_mapping.pop(NAME, None)
            AttentionMaskInterface._global_mapping.pop(NAME, None)

    def _layer_hook(self, index):
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            self.edits.layer_input(index, hidden)

        return hook

    def _attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer = module.layer_idx
        heads, length = query.shape[1], query.shape[2]
        groups = heads // key.shape[1]
        key = key.float().repeat_interleave(groups, dim=1)[0]  # [H, T, D]
        value = value.float().repeat_interleave(groups, dim=1)[0]
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        scores = (query.float()[0] @ key.transpose(-1, -2)) * scale  # [H, T, T]
        causal = torch.ones(length, length, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        scores = self.edits.scores(layer, scores)
        weights = torch.softmax(scores, dim=-1)
        weights = self.edits.weights(layer, weights)
        output = self.edits.head_output(layer, weights @ value)  # [H, T, D]
        return output.transpose(0, 1)[None].to(query.dtype), None

    @torch.no_grad()
    def logits(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, edits: Edits | None = None
    ) -> torch.Tensor:
        """Last-position logits ``[V]`` of one full forward."""
        self.edits = edits or Edits()
        try:
            inputs = {
                "input_ids": input_ids,
                "attention_mask": torch.ones_like(input_ids),
                "use_cache": False,
                "logits_to_keep": 1,
            }
            if pixel_values is not None:
                inputs["pixel_values"] = pixel_values
            return self.model(**inputs).logits[0, -1].float()
        finally:
            self.edits = Edits()


# ---------------------------------------------------------------------------------------------- methods
class Prompt:
    """Positions of one prompt (batch 1), found the way the official code does (explicit ranges)."""

    def __init__(self, input_ids: torch.Tensor, image_token_id: int, query: list[int], informative: list[int]):
        ids = input_ids[0].tolist()
        image = [i for i, t in enumerate(ids) if t == image_token_id]
        self.length = len(ids)
        self.image_start, self.image_end = image[0], image[-1] + 1  # contiguous block, as LLaVA-1.5
        self.query = query
        self.informative = informative or query
        self.image_token_id = image_token_id


class VHREdits(Edits):
    """VHR: per-head outputs of the heads with VHD above the median (after the outlier filter) times
    alpha, at every position, in the target layers; heads chosen at the prompt's last position, layer
    by layer (later layers see the reinforced earlier ones)."""

    def __init__(
        self, prompt: Prompt, text_only: dict[int, torch.Tensor], layers: list[int], alpha: float, outlier_filter: str
    ):
        self.prompt, self.text_only, self.layers, self.alpha, self.outlier_filter = (
            prompt,
            text_only,
            layers,
            alpha,
            outlier_filter,
        )

    def head_output(self, layer, output):
        if layer not in self.layers:
            return output
        with_image = output[:, self.prompt.length - 1]  # [H, D]
        without = self.text_only[layer]
        vhd = ((with_image - without) ** 2).sum(-1)
        activation = (without**2).sum(-1)
        vhd_np, act_np = vhd.double().numpy(), activation.double().numpy()
        filtered = vhd_np.copy()
        if self.outlier_filter == "always" or vhd_np.std() > 1:
            for h in range(len(vhd_np)):
                if vhd_np[h] > vhd_np.mean() + vhd_np.std() and act_np[h] > act_np.mean() + act_np.std():
                    filtered[h] = 0.0
        import numpy

        median = numpy.median(filtered)
        edited = output.clone()
        for h in range(len(filtered)):
            if filtered[h] > median:
                edited[h] = output[h] * self.alpha
        return edited


class RecordHeads(Edits):
    def __init__(self, layers):
        self.layers, self.outputs = layers, {}

    def head_output(self, layer, output):
        if layer in self.layers:
            self.outputs[layer] = output[:, -1].clone()
        return output


class VAREdits(Edits):
    """VAR as the released ``HeadFork`` / ``attn_redist``: sinks = prompt positions whose RMS-normalised
    layer input exceeds tau in a sink dimension; per head, rows after the image whose image attention
    is >= summ and whose visual-sink portion is <= rho are edited: sink weights times ``keep``, the
    freed ``(1 - keep)`` mass spread over the non-sink image tokens in proportion to their weight."""

    def __init__(self, prompt: Prompt, sink_dims, tau, layers, keep, rho, summ, require_visual_sink):
        self.prompt, self.sink_dims, self.tau, self.layers = prompt, sink_dims, tau, layers
        self.keep, self.rho, self.summ, self.require_visual_sink = keep, rho, summ, require_visual_sink
        self.sinks: dict[int, list[int]] = {}

    def layer_input(self, layer, hidden):
        x = hidden[0, : self.prompt.length].float()  # generated tokens are never sinks
        normed = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).abs()
        phi = torch.stack([normed[:, d] for d in self.sink_dims], dim=-1).max(dim=-1).values
        self.sinks[layer] = (phi > self.tau).nonzero().flatten().tolist()

    def weights(self, layer, weights):
        if layer not in self.layers:
            return weights
        im, end = self.prompt.image_start, self.prompt.image_end
        sinks = self.sinks.get(layer, [])
        visual_sinks = [i for i in sinks if im <= i < end]
        text_sinks = [i for i in sinks if not im <= i < end]
        if not visual_sinks and self.require_visual_sink:
            return weights
        edited = weights.clone()
        rows = torch.arange(end, weights.shape[1])  # text after the image and every generated token
        for h in range(weights.shape[0]):
            attention = weights[h, rows]  # [R, T]
            image_attention = attention[:, im:end]
            portion = (
                attention[:, visual_sinks].sum(-1) / (image_attention + 1e-6).sum(-1)
                if visual_sinks
                else torch.zeros(len(rows))
            )
            chosen = (portion <= 1 - self.rho) & (image_attention.sum(-1) >= self.summ)
            for r in chosen.nonzero().flatten().tolist():
                row = attention[r].clone()
                budget = (row[visual_sinks].sum() + row[text_sinks].sum()) * (1 - self.keep)
                free = row[im:end].clone()
                free[[i - im for i in visual_sinks]] = 0.0
                if free.sum() <= 0:
                    continue
                new = row.clone()
                new[text_sinks] = row[text_sinks] * self.keep
                new[visual_sinks] = row[visual_sinks] * self.keep
                new[im:end] = new[im:end] + budget * free / free.sum()
                edited[h, rows[r]] = new
        return edited


class RecordWeights(Edits):
    def __init__(self, layer):
        self.layer, self.weights_at = layer, None

    def weights(self, layer, weights):  # noqa: F811 - the hook of the base class
        if layer == self.layer:
            self.weights_at = weights.clone()
        return weights


def gift_multipliers(weights: torch.Tensor, prompt: Prompt, alpha: float, clamp_stds: float) -> torch.Tensor:
    """GIFT's saliency multipliers ``M`` over the image tokens from layer l*'s attention ``[H, T, T]``."""
    im, end = prompt.image_start, prompt.image_end
    heads = weights.shape[0]
    shift = torch.zeros(heads, len(prompt.informative), end - im)
    for k, i in enumerate(prompt.informative):
        shift[:, k] = (weights[:, i, im:end] - weights[:, i - 1, im:end]).clamp_min(0.0)
    total = shift.sum(dim=(1, 2))  # [H]
    top = total.topk(heads // 2).indices
    saliency = shift[top].mean(dim=(0, 1))  # [N]
    mean, std = saliency.mean(), saliency.std()  # torch.std: unbiased (N - 1), as the released code
    saliency = saliency.clamp(mean - clamp_stds * std, mean + clamp_stds * std)
    saliency = (saliency - saliency.min()) / (saliency.max() - saliency.min())
    return torch.exp(alpha * saliency)


class GIFTEdits(Edits):
    """GIFT's enhancement: the last prompt row and every generated row of the enhancement layers."""

    def __init__(self, prompt: Prompt, multipliers: torch.Tensor, layers: list[int], beta: float):
        self.prompt, self.multipliers, self.layers, self.beta = prompt, multipliers, layers, beta

    def weights(self, layer, weights):
        if layer not in self.layers:
            return weights
        im, end = self.prompt.image_start, self.prompt.image_end
        query = torch.tensor(self.prompt.query)
        heads = weights.shape[0]
        edited = weights.clone()
        for row in range(self.prompt.length - 1, weights.shape[1]):
            attention = weights[:, row]  # [H, T]
            new = attention.clone()
            visual_heads = attention[:, im:end].sum(-1).topk(heads // 2).indices
            before = attention[visual_heads, im:end].sum()
            new[visual_heads, im:end] = attention[visual_heads, im:end] * self.multipliers
            ratio = new[visual_heads, im:end].sum() / before
            query_heads = attention[:, query].sum(-1).topk(heads // 2).indices
            for h in query_heads.tolist():
                new[h, query] = new[h, query] * self.beta * ratio
            edited[:, row] = new / new.sum(-1, keepdim=True)
        return edited


class PAIEdits(Edits):
    """PAI: ``a + alpha * |a|`` on the image columns of the last row of each forward of the released code
    (the last prompt row at prefill, then each generated row), layers ``first_layer .. L-1``."""

    def __init__(self, prompt: Prompt, layers: list[int], alpha: float):
        self.prompt, self.layers, self.alpha = prompt, layers, alpha

    def scores(self, layer, scores):
        if layer not in self.layers:
            return scores
        im, end = self.prompt.image_start, self.prompt.image_end
        edited = scores.clone()
        rows = slice(self.prompt.length - 1, scores.shape[1])
        block = scores[:, rows, im:end]
        edited[:, rows, im:end] = block + self.alpha * block.abs()
        return edited


def contrast(
    logits: torch.Tensor, other: torch.Tensor, weight: float, plausibility: float, log_space: bool
) -> torch.Tensor:
    """``(1 + w) * a - w * b`` with tokens below ``log(plausibility) + max`` set to ``-inf``.

    PAI contrasts log-probabilities (``gamma = 1 + w``), VCD raw logits; the cut-off compares the
    image logits to their maximum in both (a constant shift does not move it).
    """
    if log_space:
        logits, other = torch.log_softmax(logits, -1), torch.log_softmax(other, -1)
    out = (1 + weight) * logits - weight * other
    cutoff = math.log(plausibility) + logits.max()
    return out.masked_fill(logits < cutoff, float("-inf"))


def repetition_penalised(logits: torch.Tensor, sequence: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """transformers' repetition penalty: the scores of tokens already in ``sequence`` (prompt included) divided by
    ``penalty`` where positive, multiplied where negative."""
    if penalty is None:
        return logits
    seen = torch.unique(sequence[0])
    picked = logits[seen]
    out = logits.clone()
    out[seen] = torch.where(picked < 0, picked * penalty, picked / penalty)
    return out


def vcd_noised(pixel_values: torch.Tensor, noise_step: int, seed: int = 0) -> torch.Tensor:
    """The released ``add_diffusion_noise`` (sigmoid schedule, 1000 steps) with the noise drawn from a
    seeded generator, one ``[C, H, W]`` pattern per image (vlm_guard's reproducible choice; the released
    code draws it unseeded)."""
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
    alpha_bar = torch.cumprod(1 - betas, 0)[noise_step]
    noise = torch.randn(tuple(pixel_values.shape[-3:]), generator=torch.Generator().manual_seed(seed))
    return (alpha_bar.sqrt() * pixel_values.double() + (1 - alpha_bar).sqrt() * noise.double()).float()


# ---------------------------------------------------------------------------------------------- decoding
def decode(
    harness: EagerHarness,
    method: str,
    preset: str,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    prompt: Prompt,
    plan: dict,
    steps: int,
    forced: list[int] | None = None,
    repetition_penalty: float | None = None,
    penalty_effect: list | None = None,
) -> tuple[list[torch.Tensor], list[int]]:
    """Reference greedy decoding: ``steps`` next-token score vectors (prefill first) and the tokens.

    ``plan`` holds the model-specific parts (layers, sink dims, tau, ...); ``forced`` feeds given tokens
    instead of the argmax (to follow a sampled run). ``repetition_penalty``: transformers' processor, where the
    released codes have it: PAI's contrast is a logits processor given to ``generate`` (``CFGLogits``), so it runs
    after transformers' own processors, on the penalised scores (the image-free scores are not penalised); VCD
    contrasts the raw logits in its own sampling loop and passes the contrast to the processors. ``penalty_effect``
    (a list) receives, per step, how far the penalty moved the scores (``inf`` where it changed the plausible set).
    """
    settings = SETTINGS[preset].get(method, {})  # "plain": no method
    num_layers = len(harness.layers)
    sequence = input_ids
    scores, tokens = [], []
    edits: Edits | None = None
    if method == "vhr":
        keep = [i for i in range(prompt.length) if not prompt.image_start <= i < prompt.image_end]
        recorder = RecordHeads(plan["vhr_layers"])
        harness.logits(input_ids[:, keep], None, recorder)
        edits = VHREdits(prompt, recorder.outputs, plan["vhr_layers"], settings["alpha"], settings["outlier_filter"])
    elif method == "var":
        layers = list(range(2, num_layers if settings["last_layer"] else num_layers - 1))
        edits = VAREdits(
            prompt,
            plan["sink_dims"],
            plan["tau"],
            layers,
            settings["keep"],
            settings["rho"],
            settings["summ"],
            settings["require_visual_sink"],
        )
    elif method == "gift":
        recorder = RecordWeights(plan["gift_saliency_layer"])
        harness.logits(input_ids, pixel_values, recorder)  # the released code's extra eager prefill
        multipliers = gift_multipliers(recorder.weights_at, prompt, settings["alpha"], settings["clamp_stds"])
        edits = GIFTEdits(prompt, multipliers, plan["gift_layers"], settings["beta"])
    elif method == "pai":
        edits = PAIEdits(prompt, list(range(settings["first_layer"], num_layers)), settings["alpha"])
    noised = vcd_noised(pixel_values, settings["noise_step"]) if method == "vcd" else None
    for step in range(steps):
        logits = harness.logits(sequence, pixel_values, edits)
        raw = logits
        if method == "pai":
            keep = [i for i in range(sequence.shape[1]) if not prompt.image_start <= i < prompt.image_end]
            text_logits = harness.logits(sequence[:, keep], None)
            final = lambda penalty: contrast(  # noqa: E731
                repetition_penalised(raw, sequence, penalty),
                text_logits,
                settings["gamma"] - 1,
                settings["plausibility"],
                log_space=True,
            )
        elif method == "vcd" and (settings["contrast_greedy"] or forced is not None):
            noised_logits = harness.logits(sequence, noised)
            final = lambda penalty: repetition_penalised(  # noqa: E731
                contrast(raw, noised_logits, settings["alpha"], settings["plausibility"], log_space=False),
                sequence,
                penalty,
            )
        else:
            final = lambda penalty: repetition_penalised(raw, sequence, penalty)  # noqa: E731
        logits = final(repetition_penalty)
        if penalty_effect is not None:
            without = final(None)
            both = torch.isfinite(logits) & torch.isfinite(without)
            moved = float((logits[both] - without[both]).abs().max()) if bool(both.any()) else 0.0
            penalty_effect.append(float("inf") if not torch.equal(torch.isinf(logits), torch.isinf(without)) else moved)
        scores.append(logits)
        token = forced[step] if forced is not None else int(logits.argmax())
        tokens.append(token)
        sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
    return scores, tokens
