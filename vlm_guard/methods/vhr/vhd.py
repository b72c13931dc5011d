"""VHD: vision-aware head divergence (He et al., ACL 2025), as small pure functions plus the recorder
that captures per-head outputs at the last prompt position.

VHD[l, h] is the distance between head h's output (before ``o_proj``) at the last prompt position,
computed with the image and with the image span deleted. The released code uses the squared L2
distance in fp32 without normalisation (``distance="sq_l2"``, our default); ``"l2"`` and ``"cosine"``
are offered as options.

For a calibrated head map (:mod:`vlm_guard.calibration.calibrate`) the per-prompt VHD ``[N, L, H]`` is
reduced to a mean and a spread over images by :class:`VHDAccumulator`; the map's VHR heads per
layer are :func:`select_vhr_heads` applied to the mean VHD and the mean text activation (the paper
selects per sample; the per-sample selection frequency is stored beside it for inspection).
"""

from __future__ import annotations

import torch

from vlm_guard.core.contract import Intervention, LayerContext
from vlm_guard.methods.vhr.config import DISTANCES, OUTLIER_FILTERS  # noqa: F401  (defined beside the config)


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


def select_vhr_heads(
    vhd: torch.Tensor, text_activation: torch.Tensor, outlier_filter: str = "released"
) -> torch.Tensor:
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
            text_activation
            > text_activation.mean(dim=-1, keepdim=True) + text_activation.std(dim=-1, keepdim=True, unbiased=False)
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


def stack_divergence(
    with_image: dict[int, torch.Tensor],
    without_image: dict[int, torch.Tensor],
    layers: list[int],
    distance: str = "sq_l2",
) -> tuple[torch.Tensor, torch.Tensor]:
    """VHD and text activation of several layers, stacked.

    Args:
        with_image / without_image: ``{layer: [B, H, D]}`` head outputs at the last prompt position
            (from two :class:`HeadOutputRecorder` runs).
        layers: the layers to stack, in order.
        distance: see :func:`head_divergence`.
    Returns:
        ``(vhd, text_activation)``, each ``[B, len(layers), H]`` fp32; ``text_activation`` is
        ``||o without image||^2`` (TA of the outlier filter).
    """
    missing = [layer for layer in layers if layer not in with_image or layer not in without_image]
    if missing:
        raise ValueError(f"no recorded head outputs for layers {missing}; record every layer in both passes")
    vhd = torch.stack(
        [
            head_divergence(with_image[layer], without_image[layer].to(with_image[layer].device), distance)
            for layer in layers
        ],
        dim=1,
    )  # [B, L', H]
    text_activation = torch.stack(
        [(without_image[layer].float() ** 2).sum(dim=-1) for layer in layers], dim=1
    )  # [B, L', H]
    return vhd, text_activation.to(vhd.device)


class VHDAccumulator:
    """Running mean and spread of VHD over prompts, plus per-sample VHR selection frequency.

    Args:
        num_layers / num_heads: shape of one VHD map.
        outlier_filter: filter used for the per-sample selection counted in ``selection_frequency``.

    Example:
        >>> acc = VHDAccumulator(1, 4)
        >>> acc.update(torch.tensor([[[1., 2., 3., 4.]]]), torch.zeros(1, 1, 4))
        >>> acc.mean
        tensor([[1., 2., 3., 4.]])
    """

    def __init__(self, num_layers: int, num_heads: int, outlier_filter: str = "released"):
        if outlier_filter not in OUTLIER_FILTERS:
            raise ValueError(f"outlier_filter={outlier_filter!r} is not known; choose one of {list(OUTLIER_FILTERS)}")
        shape = (num_layers, num_heads)
        self.outlier_filter = outlier_filter
        self.count = 0
        self._sum = torch.zeros(shape, dtype=torch.float64)
        self._sum_sq = torch.zeros(shape, dtype=torch.float64)
        self._text_sum = torch.zeros(shape, dtype=torch.float64)
        self._selected = torch.zeros(shape, dtype=torch.float64)

    def update(self, vhd: torch.Tensor, text_activation: torch.Tensor) -> None:
        """Add prompts: ``vhd`` and ``text_activation`` are ``[N, L, H]``."""
        if vhd.ndim != 3 or tuple(vhd.shape[1:]) != tuple(self._sum.shape):
            raise ValueError(f"vhd must be [N, {self._sum.shape[0]}, {self._sum.shape[1]}], got {tuple(vhd.shape)}")
        vhd64, text64 = vhd.detach().double().cpu(), text_activation.detach().double().cpu()
        self.count += vhd.shape[0]
        self._sum += vhd64.sum(dim=0)
        self._sum_sq += (vhd64**2).sum(dim=0)
        self._text_sum += text64.sum(dim=0)
        self._selected += (
            select_vhr_heads(vhd.float().cpu(), text_activation.float().cpu(), self.outlier_filter).double().sum(dim=0)
        )

    def _require(self) -> None:
        if self.count == 0:
            raise ValueError("no prompt was profiled: every image was skipped or the image list is empty")

    @property
    def mean(self) -> torch.Tensor:
        """``[L, H]`` fp32 mean VHD over prompts."""
        self._require()
        return (self._sum / self.count).float()

    @property
    def std(self) -> torch.Tensor:
        """``[L, H]`` fp32 population standard deviation over prompts (0 for one prompt)."""
        self._require()
        variance = (self._sum_sq / self.count - (self._sum / self.count) ** 2).clamp_min(0.0)
        return variance.sqrt().float()

    @property
    def text_activation_mean(self) -> torch.Tensor:
        self._require()
        return (self._text_sum / self.count).float()

    @property
    def selection_frequency(self) -> torch.Tensor:
        """``[L, H]`` fraction of prompts whose own (per-sample) selection kept the head."""
        self._require()
        return (self._selected / self.count).float()

    def map_heads(self) -> torch.Tensor:
        """``[L, H]`` bool: the head map's VHR heads (selection on the mean VHD and mean TA)."""
        return select_vhr_heads(self.mean, self.text_activation_mean, self.outlier_filter)


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
