"""The hidden representation as the per-step encoder and the one-time discovery both see it.

How the net is called (``net(x)`` or by keyword), which entry of a structured output is the
representation, and how a captured activation is pooled to (B, D). No model-family heuristics
here: those run once, in ``_discovery``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

__all__ = ["HiddenLayer", "OUTPUT", "OutputKey", "call_net", "checkpointing_hint", "pool_hidden", "select_output"]

HiddenLayer = str | int | nn.Module | None
OutputKey = str | int | tuple[str, int] | None  # a tuple: an entry's item (``feature_maps``' last)
OUTPUT = "<output>"
"""The name of the net's own output as a hidden layer."""


def pool_hidden(
    hidden: object,
    token_pool: str = "mean",
    layer: str = "hidden layer",
    advice: str | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """Reduce a captured activation to (B, D).

    Args:
        hidden: the captured activation: (B, D), (B, N, D) tokens or (B, C, H, W) maps.
        token_pool: ``"mean"`` over tokens or ``"cls"`` (the first token) for 3D input.
        layer: what produced it, the subject of error messages (``"hidden layer 'fc'"``).
        advice: the remedy the error messages end with; default: pick another hidden_layer.
        channels_last: 4D maps are (B, H, W, C) (timm's Swin and its kin), not (B, C, H, W).

    Returns:
        (B, D) tensor.

    Raises:
        TypeError: when the activation is not a tensor.
        ValueError: when it has a rank other than 2, 3 or 4.
    """
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(
            f"{layer} produced a {type(hidden).__name__}, not a tensor; "
            + (advice or "pick a hidden_layer whose output is a tensor (see net.named_modules())")
        )
    if hidden.ndim == 2:
        return hidden
    if hidden.ndim == 4:
        return hidden.mean(dim=(1, 2) if channels_last else (2, 3))  # (B, C, H, W) or (B, H, W, C) -> (B, C)
    if hidden.ndim == 3:
        return hidden[:, 0] if token_pool == "cls" else hidden.mean(dim=1)  # (B, N, D) -> (B, D)
    raise ValueError(
        f"{layer} produced a tensor of shape {tuple(hidden.shape)}; expected (B, D), (B, N, D) "
        "or (B, C, H, W). " + (advice or "Pick another hidden_layer")
    )


def call_net(net: nn.Module, x: torch.Tensor, input_name: str | None = None) -> object:
    """``net(x)``, or ``net(**{input_name: x})`` for a net that takes the image by keyword."""
    return net(x) if input_name is None else net(**{input_name: x})


def select_output(out: object, key: OutputKey) -> object:
    """The entry ``key`` of a net's output (see :class:`BackboneProbe`), or the output for None."""
    if key is None:
        return out
    if isinstance(key, tuple):  # an entry's item: a Hugging Face backbone's feature_maps[-1]
        return select_output(select_output(out, key[0]), key[1])
    if isinstance(key, str):
        return out[key] if isinstance(out, Mapping) else getattr(out, key)
    if isinstance(out, (tuple, list)):
        return out[key]
    return out.to_tuple()[key]  # type: ignore[attr-defined]


def checkpointing_hint(net: nn.Module) -> str:
    """A clause for "this layer never ran" when the net checkpoints its blocks the timm way.

    timm's ``checkpoint_seq`` runs a stage's blocks one by one without calling the stage (``layer4``), so a
    hook on the stage never fires while ``grad_checkpointing`` is on; its blocks (``layer4.1``) still run.
    Returns "" when no module of ``net`` has it on.
    """
    if not any(getattr(m, "grad_checkpointing", False) is True for m in net.modules()):
        return ""
    return (
        " (gradient checkpointing is on, and timm's runs a stage's blocks without calling the stage: "
        "hook a block such as its last, or hidden_layer='auto', or turn checkpointing off)"
    )
