"""VAR sink measures (Kang et al., ICLR 2025): massive activations in a few hidden dimensions mark
attention-sink tokens.

``phi(x) = max_{d in D} |x_d| / sqrt(mean(x^2) + 1e-6)`` on the residual stream entering a layer
(before its norm, fp32); tokens with ``phi > tau`` (tau = 20) are sinks.
"""

from __future__ import annotations

import torch

SINK_THRESHOLD = 20.0
EPSILON = 1e-6


def sink_scores(hidden_states: torch.Tensor, sink_dims: list[int] | torch.Tensor) -> torch.Tensor:
    """phi per token.

    Args:
        hidden_states: ``[..., M]`` residual stream (any dtype; computed in fp32).
        sink_dims: the sink dimensions D (non-empty).
    Returns:
        ``[...]`` fp32 scores.

    Example:
        >>> x = torch.ones(1, 2, 4); x[0, 0, 3] = 40.0
        >>> sink_scores(x, [3]).round()
        tensor([[2., 1.]])
    """
    if len(sink_dims) == 0:
        raise ValueError("sink_dims is empty: this model has no sink dimensions (VAR cannot run); calibrate it or pass sink_dims")
    x = hidden_states.float()
    rms = torch.sqrt(x.pow(2).mean(dim=-1) + EPSILON)  # [...]
    index = torch.as_tensor(sink_dims, device=x.device, dtype=torch.long)
    return x.index_select(-1, index).abs().amax(dim=-1) / rms


def massive_activation_ratios(hidden_states: torch.Tensor) -> torch.Tensor:
    """``|x_d| / rms(x)`` for every dimension: ``[..., M] -> [..., M]`` fp32."""
    x = hidden_states.float()
    return x.abs() / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + EPSILON)
