"""The per-step capture of a backbone's hidden layer, pooled to (B, D), and the projector after it.

``BackboneEncoder`` runs every training step: it calls the net (``_hidden.call_net``), takes the
hidden layer from a forward (pre-)hook or from the net's output, pools it (``pool_hidden``) and
projects it. Which layer that is was decided once, at construction, by the probe in
``_discovery`` (``probe_backbone``): the module docstring there says how ``hidden_layer`` is
resolved (a module name, a child index, ``-1``, or ``"auto"``).

Whatever is captured is reduced to (B, D) by :func:`pool_hidden`: 4D maps (B, C, H, W)
are average-pooled over H and W (maps that are (B, H, W, C), as timm's Swin gives them, over
their H and W too: the probe tells the two layouts apart); token sequences (B, N, D) are mean-pooled over the
tokens by default (``token_pool="mean"`` works with and without a class token) or
reduced to their first token (``token_pool="cls"``); nothing is ever flattened.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._discovery import BackboneProbe, detect_input_name, infer_channels, probe_backbone
from ._hidden import HiddenLayer, OutputKey, call_net, checkpointing_hint, pool_hidden, select_output

__all__ = [
    "BackboneEncoder",
    "BackboneProbe",
    "HiddenLayer",
    "call_net",
    "detect_input_name",
    "infer_channels",
    "pool_hidden",
    "probe_backbone",
    "select_output",
]


_NOT_RUN = object()  # what a capture holds before its layer runs


class _Capture:
    """A forward (pre-)hook that keeps the tensor it sees while armed.

    A plain picklable object rather than a closure, so that a network carrying it
    survives ``copy.deepcopy`` (the copy's hook points at the copy's capture) and
    pickling. While disarmed it does nothing, so the user's own calls of ``net(x)``
    neither store activations nor pay anything.
    """

    def __init__(self, use_input: bool):
        self.use_input = use_input
        self.armed = False
        self.value: object = None

    def __call__(self, module: nn.Module, args: tuple, output: object = None) -> None:
        if self.armed:
            self.value = (args[0] if args else None) if self.use_input else output


class BackboneEncoder(nn.Module):
    """A backbone plus projector that returns (projection, pooled hidden representation).

    Args:
        net: the backbone, trained in place.
        layer_name: the resolved hidden layer name (``"<output>"`` for the net's output).
        layer: the module to hook, or None to use (an entry of) the net's output.
        use_input: capture the layer's input (forward pre-hook) instead of its output.
        projector: the projection head, (B, D) -> (B, P).
        token_pool: ``"mean"`` or ``"cls"`` pooling for token sequences.
        output_key: with ``layer`` None, the entry of the net's output to use (see
            :class:`BackboneProbe`); None for the output itself.
        input_name: the keyword the net takes the image by; None calls ``net(x)``.
        channels_last: the captured 4D maps are (B, H, W, C) (see :class:`BackboneProbe`).
    """

    def __init__(
        self,
        net: nn.Module,
        layer_name: str,
        layer: nn.Module | None,
        use_input: bool,
        projector: nn.Module,
        token_pool: str = "mean",
        *,
        output_key: OutputKey = None,
        input_name: str | None = None,
        channels_last: bool = False,
    ):
        super().__init__()
        self.net = net
        self.projector = projector
        self.layer_name = layer_name
        self.token_pool = token_pool
        self.output_key = output_key
        self.input_name = input_name
        self.channels_last = channels_last
        self._capture: _Capture | None = None
        if layer is not None:
            self._capture = _Capture(use_input)
            if use_input:
                layer.register_forward_pre_hook(self._capture)
            else:
                layer.register_forward_hook(self._capture)

    @classmethod
    def from_probe(cls, net: nn.Module, probe: BackboneProbe, projector: nn.Module, token_pool: str = "mean"):
        """The encoder capturing what :func:`probe_backbone` found.

        Args:
            net: the probed backbone.
            probe: its probe result.
            projector: the projection head.
            token_pool: ``"mean"`` or ``"cls"``.

        Returns:
            A :class:`BackboneEncoder`.
        """
        return cls(
            net,
            probe.name,
            probe.module,
            probe.use_input,
            projector,
            token_pool,
            output_key=probe.output_key,
            input_name=probe.input_name,
            channels_last=probe.channels_last,
        )

    def remove_hook(self) -> None:
        """Take the capture hook off the net; the encoder cannot run afterwards (``embed`` raises)."""
        self._removed = True  # also without a hook (the net's output): the learner refuses to run, as documented
        if self._capture is None:
            return
        for module in self.net.modules():
            for hooks in (module._forward_hooks, module._forward_pre_hooks):
                for key in [k for k, hook in hooks.items() if hook is self._capture]:
                    del hooks[key]
        self._capture = None

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled hidden representation, (B, D)."""
        if getattr(self, "_removed", False):
            raise RuntimeError(
                "this learner's hook was taken off its net (remove_hooks()): it cannot train or embed any more; "
                "build BYOL(net, ...) again to go on"
            )
        capture = self._capture
        if capture is None:
            hidden = select_output(call_net(self.net, x, self.input_name), self.output_key)
        else:
            capture.armed, capture.value = True, _NOT_RUN
            try:
                call_net(self.net, x, self.input_name)
            finally:
                capture.armed = False
            hidden, capture.value = capture.value, None
            if hidden is _NOT_RUN:
                raise RuntimeError(
                    f"hidden layer {self.layer_name!r} did not run in this forward of {type(self.net).__name__}"
                    f"{checkpointing_hint(self.net)}: the module hooked when the learner was built was replaced "
                    "or is skipped (net.fc = nn.Identity() after wrapping, say); change the net first, then build BYOL"
                )
        layer = f"hidden layer {self.layer_name!r}"
        return pool_hidden(hidden, self.token_pool, layer=layer, channels_last=self.channels_last)

    def forward(self, x: torch.Tensor, return_projection: bool = True):
        """Args:
            x: (B, C, H, W) network input.
            return_projection: also run the projector.

        Returns:
            ``(projection (B, P), representation (B, D))``, or the representation alone
            when ``return_projection`` is False.
        """
        representation = self.embed(x)
        if not return_projection:
            return representation
        return self.projector(representation), representation
