"""VHD: vision-aware head divergence (He et al., ACL 2025), as small pure functions plus the recorder
that captures per-head outputs at the last prompt position.

VHD[l, h] is the distance between head h's output (before ``o_proj``) at the last prompt position,
computed with the image and with the image span deleted. The released code uses the squared L2
distance in fp32 without normalisation (``distance="sq_l2"``, our default); ``"l2"`` and ``"cosine"``
are offered as options.
"""

from __future__ import annotations

import torch

from ..decoding.base import Intervention, LayerContext

DISTANCES = ("sq_l2", "l2", "cosine")
OUTLIER_FILTERS = ("released", "always", "off")


def head_divergence(with_image: torch.Tensor, without_image: torch.Tensor, distance: str = "sq_l2") -> torch.Tensor:
    """Per-head distance.

    Args:
        with_image: ``[..., H, D]`` head outputs with the image.
        without_image: ``[..., H, D]`` head outputs of the image-free prompt.
        distance: ``"sq_l2"`` (released code), ``"l2"`` or ``"cosine"`` (1 - cosine similarity).
    Returns:
        ``[..., H]`` fp32.

    Example:
        >>> head_divergence(torch.ones(1, 2, 3), torch.zeros(1, 2, 3))
        tensor([[3., 3.]])
    """
    a, b = with_image.float(), without_image.float()
    if distance == "sq_l2":
        return ((a - b) ** 2).sum(dim=-1)
    if distance == "l2":
        return (a - b).norm(dim=-1)
    if distance == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8)
    raise ValueError(f"distance={distance!r} is not known; choose one of {list(DISTANCES)}")


def select_vhr_heads(vhd: torch.Tensor, text_activation: torch.Tensor, outlier_filter: str = "released") -> torch.Tensor:
    """The VHR head selection of one layer.

    1. Outlier filter: zero VHD[h] when both VHD[h] > mean + std and TA[h] > mean_TA + std_TA, where
       TA[h] = ||o_h without image||^2. The released code runs it only when std(VHD) > 1
       (``"released"``); ``"always"`` runs it unconditionally, ``"off"`` never.
    2. Keep heads with VHD strictly above the layer's median.

    Args:
        vhd: ``[..., H]`` divergences of one layer.
        text_activation: ``[..., H]`` TA, squared norms of the image-free head outputs.
        outlier_filter: ``"released"``, ``"always"`` or ``"off"``.
    Returns:
        ``[..., H]`` bool, the kept heads.

    Example:
        >>> select_vhr_heads(torch.tensor([1., 2., 3., 4.]), torch.zeros(4), "off")
        tensor([False, False,  True,  True])
    """
    if outlier_filter not in OUTLIER_FILTERS:
        raise ValueError(f"outlier_filter={outlier_filter!r} is not known; choose one of {list(OUTLIER_FILTERS)}")
    vhd = vhd.float()
    if outlier_filter != "off":
        std = vhd.std(dim=-1, keepdim=True, unbiased=False)
        outlier = (vhd > vhd.mean(dim=-1, keepdim=True) + std) & (
            text_activation > text_activation.mean(dim=-1, keepdim=True) + text_activation.std(dim=-1, keepdim=True, unbiased=False)
        )
        if outlier_filter == "released":
            outlier &= std > 1
        vhd = torch.where(outlier, torch.zeros_like(vhd), vhd)
    # torch.median returns the lower middle value for even counts; the released code uses numpy's median
    median = vhd.quantile(0.5, dim=-1, keepdim=True)
    return vhd > median


def default_target_layers(num_layers: int) -> list[int]:
    """The paper's LLaVA-1.5-7B recipe (layer 1 plus the last 14 of 32) mapped to ``num_layers``:
    layer 1 plus the last ``round(num_layers * 14 / 32)`` layers."""
    last = max(1, round(num_layers * 14 / 32))
    layers = set(range(num_layers - last, num_layers))
    if num_layers > 1:
        layers.add(1)
    return sorted(layers)


class HeadOutputRecorder(Intervention):
    """Records per-head outputs at the last prompt position during a prefill (observation only).

    After a forward call, ``outputs[layer]`` is ``[B, H, D]`` fp32 for each requested layer.
    """

    name = "head_output_recorder"
    needs_image = False
    uses_head_output = True

    def __init__(self, layers: list[int] | set[int]):
        self._layers = set(layers)
        self.outputs: dict[int, torch.Tensor] = {}

    def layers(self) -> set[int]:
        return self._layers

    def on_head_output(self, ctx: LayerContext, head_output: torch.Tensor) -> torch.Tensor:
        if ctx.phase == "prefill":
            self.outputs[ctx.layer] = head_output[:, -1].detach().float()  # [B, H, D]
        return head_output
