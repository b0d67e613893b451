"""Finding the hidden layer of an arbitrary backbone, capturing it, pooling it to (B, D).

The hidden layer can be named three ways, as in lucidrains/byol-pytorch:

* a module name from ``net.named_modules()`` (``"avgpool"``, ``"head.global_pool"``):
  its output is captured with a forward hook;
* an integer: an index into ``list(net.children())`` (``-2`` is resnet's avgpool), and
  ``-1`` for the net's own output;
* ``"auto"`` (the default): the input of the final classifier ``nn.Linear`` (a forward
  pre-hook), or the net's output when the net has no classifier
  (``timm.create_model(..., num_classes=0)``).

Whatever is captured is reduced to (B, D): 4D maps (B, C, H, W) are average-pooled
over H and W; token sequences (B, N, D) are mean-pooled over the tokens by default
(``token_pool="mean"`` works with and without a class token) or reduced to their first
token (``token_pool="cls"``); nothing is ever flattened into a huge vector.

The layer is found by one probe forward at construction, in eval mode under
``torch.no_grad()`` on a zero image, with every module's training flag restored
afterwards: the user's net (weights, BatchNorm statistics, RNG) is left untouched.
"""

from __future__ import annotations

import difflib

import torch
import torch.nn as nn

__all__ = ["BackboneEncoder", "HiddenLayer", "pool_hidden", "probe_backbone"]

HiddenLayer = str | int | None
_OUTPUT = "<output>"


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
        self.value: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple, output: object = None) -> None:
        if self.armed:
            self.value = args[0] if self.use_input else output


def pool_hidden(hidden: object, token_pool: str = "mean", layer: str = "hidden layer") -> torch.Tensor:
    """Reduce a captured activation to (B, D).

    Args:
        hidden: the captured activation: (B, D), (B, N, D) tokens or (B, C, H, W) maps.
        token_pool: ``"mean"`` over tokens or ``"cls"`` (the first token) for 3D input.
        layer: the layer's name, for error messages.

    Returns:
        (B, D) tensor.

    Raises:
        TypeError: when the activation is not a tensor.
        ValueError: when it has a rank other than 2, 3 or 4.
    """
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(
            f"{layer} produced a {type(hidden).__name__}, not a tensor; pick a hidden_layer "
            "whose output is a tensor (see net.named_modules())"
        )
    if hidden.ndim == 2:
        return hidden
    if hidden.ndim == 4:
        return hidden.mean(dim=(2, 3))  # (B, C, H, W) -> (B, C)
    if hidden.ndim == 3:
        return hidden[:, 0] if token_pool == "cls" else hidden.mean(dim=1)  # (B, N, D) -> (B, D)
    raise ValueError(
        f"{layer} produced a tensor of shape {tuple(hidden.shape)}; expected (B, D), (B, N, D) "
        "or (B, C, H, W). Pick another hidden_layer"
    )


def _first_param_like(net: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in list(net.parameters()) + list(net.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.float32


def infer_channels(net: nn.Module) -> int:
    """The input channel count of the first convolution (3 when there is none)."""
    for module in net.modules():
        channels = getattr(module, "in_channels", None)
        if isinstance(module, nn.modules.conv._ConvNd) and isinstance(channels, int):
            return channels
    return 3


def _resolve_layer(net: nn.Module, hidden_layer: HiddenLayer) -> tuple[str, nn.Module | None]:
    """Map a user's hidden_layer to (name, module); module None means the net's output."""
    if hidden_layer is None or hidden_layer == "auto":
        return "auto", None
    if isinstance(hidden_layer, bool) or not isinstance(hidden_layer, (int, str)):
        raise TypeError(
            f"hidden_layer must be a module name (str), a child index (int) or 'auto', "
            f"got {type(hidden_layer).__name__}"
        )
    if isinstance(hidden_layer, int):
        if hidden_layer == -1:
            return _OUTPUT, None
        children = list(net.named_children())
        if not -len(children) <= hidden_layer < len(children):
            names = ", ".join(f"{i}: {n}" for i, (n, _) in enumerate(children))
            raise ValueError(
                f"hidden_layer={hidden_layer} is out of range: the net has {len(children)} "
                f"direct children ({names}); use an index in range, a module name, or -1 for the output"
            )
        name, module = children[hidden_layer]
        return name, module
    modules = dict(net.named_modules())
    if hidden_layer in modules and hidden_layer != "":
        return hidden_layer, modules[hidden_layer]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(hidden_layer, names, n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    top = ", ".join(repr(n) for n, _ in net.named_children())
    raise ValueError(
        f"hidden layer {hidden_layer!r} not found in {type(net).__name__}; {hint}"
        f"top-level modules: {top}. Pass a name from net.named_modules(), a child index, "
        "-1 for the net's output, or 'auto'"
    )


def probe_backbone(
    net: nn.Module,
    image_size: tuple[int, int],
    channels: int,
    hidden_layer: HiddenLayer,
    token_pool: str = "mean",
) -> dict[str, object]:
    """Run the net once on zeros to find the hidden layer, its width and the unused tail.

    Eval mode, ``torch.no_grad()``, every module's training flag restored afterwards;
    no random number is drawn, so the user's RNG stream is untouched too.

    Args:
        net: the backbone.
        image_size: (H, W) of the training views.
        channels: input channels.
        hidden_layer: see the module docstring.
        token_pool: pooling of token sequences.

    Returns:
        dict with ``name`` (resolved layer name or ``"<output>"``), ``module`` (the
        hooked module or None), ``use_input`` (pre-hook), ``dim`` (pooled width) and
        ``unused`` (names of parameters of modules that run after the capture point).

    Raises:
        ValueError: the layer is not found, never runs, or the probe forward fails.
    """
    name, module = _resolve_layer(net, hidden_layer)
    auto = name == "auto"
    module_names = {m: n for n, m in net.named_modules()}
    device, dtype = _first_param_like(net)
    modes = {m: m.training for m in net.modules()}
    events: list[tuple[str, nn.Module]] = []  # ("start" | "end", module) in execution order
    seen_inputs: dict[nn.Module, object] = {}  # last input of each Linear (auto) or of the layer
    seen_outputs: dict[nn.Module, object] = {}  # last output of each Linear or of the layer
    handles = []

    def on_start(mod: nn.Module, args: tuple) -> None:
        events.append(("start", mod))
        if isinstance(mod, nn.Linear) and args:
            seen_inputs[mod] = args[0]

    def on_end(mod: nn.Module, args: tuple, out: object) -> None:
        events.append(("end", mod))
        if isinstance(mod, nn.Linear) or mod is module:
            seen_outputs[mod] = out

    for m in net.modules():
        handles.append(m.register_forward_pre_hook(on_start))
        handles.append(m.register_forward_hook(on_end))
    x = torch.zeros(2, channels, *image_size, device=device, dtype=dtype)
    try:
        net.eval()
        with torch.no_grad():
            out = net(x)
    except Exception as err:
        raise ValueError(
            f"could not run {type(net).__name__} on a probe batch of shape {tuple(x.shape)}: {err}. "
            "Check image_size and the channel count (pass channels=... if the net does not start "
            "with a convolution)"
        ) from err
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode

    use_input = False
    if auto:
        # The final classifier: the last Linear to run, when its output is the net's output.
        linears = [m for kind, m in events if kind == "end" and isinstance(m, nn.Linear)]
        last = seen_outputs.get(linears[-1]) if linears else None
        if (
            isinstance(out, torch.Tensor)
            and isinstance(last, torch.Tensor)
            and (last is out or (last.shape == out.shape and torch.equal(last, out)))
        ):
            name, module, use_input = module_names[linears[-1]], linears[-1], True
        else:
            name, module = _OUTPUT, None

    if module is None:
        hidden, capture_index = out, len(events)
    else:
        kind = "start" if use_input else "end"
        positions = [i for i, (k, m) in enumerate(events) if k == kind and m is module]
        if not positions:
            raise ValueError(
                f"hidden layer {name!r} exists but never ran during the forward pass of "
                f"{type(net).__name__}; pick a layer on the forward path"
            )
        capture_index = positions[-1]
        hidden = seen_inputs[module] if use_input else seen_outputs[module]
    dim = pool_hidden(hidden, token_pool, layer=f"hidden layer {name!r}").shape[-1]

    # Parameters of modules whose first call starts after the capture point get no
    # gradient from BYOL: DDP must be told to ignore them.
    first_start: dict[nn.Module, int] = {}
    for i, (kind, m) in enumerate(events):
        if kind == "start":
            first_start.setdefault(m, i)
    dead_modules = [m for m, i in first_start.items() if i >= capture_index or (use_input and m is module)]
    live: set[int] = {
        id(p) for m, i in first_start.items() if m not in dead_modules for p in m.parameters(recurse=False)
    }
    unused = [
        f"{module_names[m]}.{pn}" if module_names[m] else pn
        for m in dead_modules
        for pn, p in m.named_parameters(recurse=False)
        if id(p) not in live and p.requires_grad
    ]
    return {"name": name, "module": module, "use_input": use_input, "dim": int(dim), "unused": unused}


class BackboneEncoder(nn.Module):
    """A backbone plus projector that returns (projection, pooled hidden representation).

    Args:
        net: the backbone, trained in place.
        layer_name: the resolved hidden layer name (``"<output>"`` for the net's output).
        layer: the module to hook, or None to use the net's output.
        use_input: capture the layer's input (forward pre-hook) instead of its output.
        projector: the projection head, (B, D) -> (B, P).
        token_pool: ``"mean"`` or ``"cls"`` pooling for token sequences.
    """

    def __init__(
        self,
        net: nn.Module,
        layer_name: str,
        layer: nn.Module | None,
        use_input: bool,
        projector: nn.Module,
        token_pool: str = "mean",
    ):
        super().__init__()
        self.net = net
        self.projector = projector
        self.layer_name = layer_name
        self.token_pool = token_pool
        self._capture: _Capture | None = None
        if layer is not None:
            self._capture = _Capture(use_input)
            if use_input:
                layer.register_forward_pre_hook(self._capture)
            else:
                layer.register_forward_hook(self._capture)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled hidden representation, (B, D)."""
        capture = self._capture
        if capture is None:
            hidden = self.net(x)
        else:
            capture.armed = True
            try:
                self.net(x)
            finally:
                capture.armed = False
            hidden, capture.value = capture.value, None
        return pool_hidden(hidden, self.token_pool, layer=f"hidden layer {self.layer_name!r}")

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
