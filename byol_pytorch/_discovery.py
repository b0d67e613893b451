"""Finding the hidden layer of an arbitrary backbone: the one-time probe and its heuristics.

The hidden layer can be named three ways, as in lucidrains/byol-pytorch, and a fourth:

* a module name from ``net.named_modules()`` (``"avgpool"``, ``"head.global_pool"``):
  its output is captured with a forward hook; it must be a tensor;
* the module itself (``net.layer4``), which stands for its name (the first, when the net
  reaches it by two); the net itself stands for ``-1``;
* an integer: an index into ``list(net.children())`` (``-2`` is resnet's avgpool), and
  ``-1`` for the net's own output;
* ``"auto"`` (the default): the representation a practitioner would take, found from
  what the net returns:

  - a tensor: the input of the final classifier ``nn.Linear`` (a forward pre-hook) when
    the output is that Linear's output (unless that Linear is the net's first layer: its input
    is the images); else the output itself (``num_classes=0``);
  - a mapping or a ``transformers`` ``ModelOutput`` (duck-typed: a ``Mapping``, a
    dataclass, or anything with ``.to_tuple()``): with a classifier (its ``logits``
    entry is a Linear's output), the input of that classifier; else ``pooler_output``
    (the model's own pooled vector: CLIP's post-layernormed class token, ViT's
    dense + tanh pooler, which BYOL then trains too, ResNet's (B, C, 1, 1) average),
    else ``last_hidden_state``, else the first tensor entry;
  - a tuple or list: the same, on its first tensor; feature maps of one batch whose grids
    never grow and shrink somewhere (timm's ``features_only=True``: shallow to deep), or
    entries of one shape throughout (a ViT's blocks), the last, deepest one;
  - a (B, K) output that is the softmax or log-softmax of the last Linear's (B, K) output,
    at any temperature (``F.log_softmax(self.fc2(x))``), or, in a net that declares K classes
    (``num_classes``, ``config.num_labels``), any other function of that output alone
    (``torch.sigmoid(self.fc(x))``, ``self.fc(x) / T``: its autograd graph reaches the net only
    through it; without the declaration, ``torch.tanh(self.fc(x))`` may be features): the
    input of that Linear;
  - a (B, K) output that is the last Conv2d's (B, K, H, W) output averaged over the map
    (ReLU'd or not) in a net that declares K classes (``num_classes``, ``config.num_labels``):
    a classifier written as a convolution (SqueezeNet's), and the input of that Conv2d;
  - several classifier Linears combined, e.g. distillation heads averaged,
    ``(head(x) + head_dist(x)) / 2``: when the last Linears to run all have the
    output's width and the output depends on each of them, their shared input; when
    their inputs differ (``head(x[:, 0])``, ``head_dist(x[:, 1])``), the last tensor a
    module produced before the heads started whose pooled width is theirs (the final
    norm's tokens; a module whose output is one head's input, PiT's dropout, is passed over).

  A net whose output has none of these gets an error listing the layers that would
  work, last first, with a ``hidden_layer="..."`` call. A layer, chosen or named, that no
  trainable parameter of the net reaches is an error: BYOL would train its heads only.

Whatever is captured is reduced to (B, D) by :func:`pool_hidden`: 4D maps (B, C, H, W)
are average-pooled over H and W (a (B, H, W, C) map, told apart by which of its dims fit
the probe image's grid, over its H and W); token sequences (B, N, D) are mean-pooled over the
tokens by default (``token_pool="mean"`` works with and without a class token) or
reduced to their first token (``token_pool="cls"``); nothing is ever flattened.

The net is called as ``net(x)``, or as ``net(pixel_values=x)`` when its ``forward``
names its first positional parameter ``pixel_values`` or takes the image only by
keyword (see :func:`detect_input_name`); ``input_name`` forces a keyword. Probe and
training call the net the same way.

The layer is found by one probe forward at construction, on a deep copy of the net in
eval mode, on a fixed image drawn without the RNG: the user's net (weights, BatchNorm
statistics, caches, training flags) and the RNG stream are left untouched. The probe
keeps autograd on, so that the parameters the representation does not depend on (the
classifier, an unused pooler, a mask token) are read off its graph: DDP is told to
ignore exactly those.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import operator
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ._hidden import OUTPUT as _OUTPUT
from ._hidden import HiddenLayer, OutputKey, call_net, checkpointing_hint, pool_hidden, select_output
from ._modules import deepcopy_module, module_device_dtype, saved_modes

__all__ = ["BackboneProbe", "detect_input_name", "infer_channels", "layer_by_name", "probe_backbone"]

_PROBE_BATCH = 2
_CANDIDATES = 5


@dataclass(frozen=True)
class BackboneProbe:
    """What the probe forward found: where the representation is and what it costs.

    Attributes:
        name: the resolved layer name, ``"<output>"`` for the net's output, or
            ``"<output>.pooler_output"`` / ``"<output>[0]"`` for an entry of it.
        module: the hooked module, or None when the representation is (an entry of)
            the net's output.
        use_input: capture the module's input (forward pre-hook) instead of its output.
        dim: the pooled width D of the representation.
        unused: names of the trainable parameters the representation does not depend
            on (the classifier, an unused pooler), relative to the net.
        output_key: with ``module`` None, the entry of the net's output: a key or an
            attribute name (str), an index (int), or None for the output itself.
        input_name: the keyword the net takes the image by, or None for ``net(x)``.
        channels_last: the representation is a (B, H, W, C) map (timm's Swin and its kin),
            told from (B, C, H, W) by which dims fit the probe image's grid.
    """

    name: str
    module: nn.Module | None
    use_input: bool
    dim: int
    unused: tuple[str, ...] = ()
    output_key: OutputKey = None
    input_name: str | None = None
    channels_last: bool = False


def _pooled_width(value: object, batch: int) -> int | None:
    """D of a tensor :func:`pool_hidden` takes, for a batch of ``batch``; None otherwise."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.ndim not in (2, 3, 4):
        return None
    if value.shape[0] != batch:
        return None
    return int(value.shape[1] if value.ndim == 4 else value.shape[-1])


# ----------------------------------------------------------------------------- calling the net
def detect_input_name(net: nn.Module) -> str | None:
    """The keyword ``net.forward`` takes the image by, or None to pass it positionally.

    ``pixel_values`` when that is the name of the first positional parameter (Hugging
    Face ``transformers`` models); when ``forward`` takes no positional parameter, its
    keyword-only ``pixel_values`` if present, else its first keyword-only parameter.

    Args:
        net: the backbone.

    Returns:
        The keyword, or None (``net(x)``).
    """
    try:
        params = list(inspect.signature(net.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    kinds = inspect.Parameter
    for p in params:
        if p.kind in (kinds.POSITIONAL_ONLY, kinds.VAR_POSITIONAL):
            return None
        if p.kind is kinds.POSITIONAL_OR_KEYWORD:
            return p.name if p.name == "pixel_values" else None
    keyword = [p.name for p in params if p.kind is kinds.KEYWORD_ONLY]
    if "pixel_values" in keyword:
        return "pixel_values"
    return keyword[0] if keyword else None


def _check_keyword(net: nn.Module, input_name: str) -> None:
    """A ``ValueError`` naming the keywords ``net.forward`` takes when ``input_name`` is none of them
    (nothing when its signature cannot be read or it takes ``**kwargs``)."""
    try:
        params = list(inspect.signature(net.forward).parameters.values())
    except (TypeError, ValueError):
        return
    kinds = inspect.Parameter
    if any(p.kind is kinds.VAR_KEYWORD for p in params):
        return
    names = [p.name for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)]
    if input_name not in names:
        takes = ", ".join(names) if names else "no keyword argument"
        raise ValueError(
            f"input_name={input_name!r}: {type(net).__name__}.forward takes no argument of that name (it takes: "
            f"{takes}); pass the name of the argument that takes the images, or leave input_name out to call net(x)"
        )


def _entries(out: object) -> list[tuple[str | int, object]] | None:
    """The (key, value) entries of a structured output; None for anything else (a tensor)."""
    if isinstance(out, Mapping):
        return [(k, v) for k, v in out.items() if isinstance(k, str)]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [(f.name, getattr(out, f.name, None)) for f in dataclasses.fields(out)]
    if isinstance(out, (tuple, list)):
        return list(enumerate(out))
    to_tuple = getattr(out, "to_tuple", None)
    if callable(to_tuple):
        values = to_tuple()
        if isinstance(values, (tuple, list)):
            return list(enumerate(values))
    return None


def _key_name(key: OutputKey) -> str:
    if key is None:
        return _OUTPUT
    if isinstance(key, tuple):
        return f"{_OUTPUT}.{key[0]}[{key[1]}]"
    return f"{_OUTPUT}.{key}" if isinstance(key, str) else f"{_OUTPUT}[{key}]"


def _first_tensor(entries: list[tuple[str | int, object]]) -> str | int | None:
    return next((k for k, v in entries if isinstance(v, torch.Tensor)), None)


def _classifier_target(out: object) -> torch.Tensor | None:
    """What a final classifier would have produced: the output, its ``logits``, a tuple's first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    entries = _entries(out)
    if entries is None:
        return None
    values = dict(entries)
    if isinstance(values.get("logits"), torch.Tensor):
        return values["logits"]  # type: ignore[return-value]
    if isinstance(out, (tuple, list)):
        key = _first_tensor(entries)
        return None if key is None else values[key]  # type: ignore[return-value]
    return None


def _representation_key(out: object, image_size: tuple[int, int]) -> OutputKey:
    """Without a classifier: ``pooler_output``, ``last_hidden_state``, a pyramid's last map (a tuple's, a
    mapping's of shrinking grids, or a Hugging Face backbone's ``feature_maps``), the first tensor."""
    entries = _entries(out)
    if entries is None:
        return None
    if isinstance(out, (tuple, list)) and _pyramid(out, image_size):
        return _deepest(entries)
    values = dict(entries)
    for key in ("pooler_output", "last_hidden_state"):
        if isinstance(values.get(key), torch.Tensor):
            return key
    if isinstance(out, Mapping) and _shrinking(list(values.values()), image_size):
        return _deepest(entries)  # a dict of stages' maps (torchvision's IntermediateLayerGetter, timm's
        # features_only with feature_cls="dict", create_feature_extractor): the deepest, as of a tuple
    maps = values.get("feature_maps")  # a Hugging Face backbone (AutoBackbone): its stages' maps, the deepest last
    if isinstance(maps, (tuple, list)) and maps and (len(maps) == 1 or _pyramid(maps, image_size)):
        if isinstance(maps[-1], torch.Tensor) and maps[-1].is_floating_point():
            return ("feature_maps", len(maps) - 1)
    return _first_tensor(entries)


def _deepest(entries: list[tuple[str | int, object]]) -> str | int:
    """The pyramid entry that the most trainable parameters reach, the last of equals: the deepest stage, not a
    parameter-free level after it (an FPN's ``pool``, a max-pool of its last map) nor a shallow one."""
    reached = [len(_graph_leaves(value)) for _, value in entries]
    most = max(reached)
    return next(key for (key, _), count in zip(reversed(entries), reversed(reached)) if count == most)


def _shrinking(maps: list[Any], image_size: tuple[int, int]) -> bool:
    """A pyramid whose grids shrink: not entries of one shape (a dict's ``features`` and ``features_normed``)."""
    return _pyramid(maps, image_size) and len({tuple(v.shape) for v in maps}) > 1


def _pyramid(out: tuple | list, image_size: tuple[int, int]) -> bool:
    """Feature maps or token sequences of one batch, shallow to deep (timm's ``features_only``, a ViT's blocks).

    Either entries of one shape throughout (a ViT's blocks, a dilated net's stages), or 4D maps
    whose grids (``_is_channels_last`` tells where the grid is) never grow from one to the next
    and shrink somewhere. Not a pair such as ``(features, mask logits)`` on one grid, or
    ``(tokens, attention weights)``: their shapes differ and no grid shrinks.
    """
    if len(out) < 2 or not all(isinstance(v, torch.Tensor) and v.is_floating_point() for v in out):
        return False
    if len({tuple(v.shape) for v in out}) == 1:
        return out[0].ndim in (3, 4)
    if not all(v.ndim == 4 for v in out) or len({v.shape[0] for v in out}) != 1:
        return False
    areas = [v.shape[1] * v.shape[2] if _is_channels_last(v, image_size) else v.shape[2] * v.shape[3] for v in out]
    return all(b <= a for a, b in zip(areas, areas[1:])) and areas[-1] < areas[0]


def _graph_nodes(tensor: object, stop: object = None) -> Iterator[object]:
    """The autograd nodes of ``tensor``'s graph, each once; ``stop`` is yielded but not walked past."""
    seen: set[object] = set()
    stack = [getattr(tensor, "grad_fn", None)]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        yield fn
        if fn is not stop:
            stack.extend(f for f, _ in fn.next_functions)


def _graph_leaves(tensor: object) -> set[int]:
    """ids of the leaf tensors (parameters) the autograd graph of ``tensor`` reaches."""
    variables = (getattr(fn, "variable", None) for fn in _graph_nodes(tensor))
    return {id(variable) for variable in variables if variable is not None}


def _only_through(target: torch.Tensor, scores: torch.Tensor, before: object) -> bool:
    """Whether ``target``'s graph reaches ``scores`` and reaches ``before``'s leaves only through it.

    ``sigmoid(fc(x))``, ``fc(x) / T``, ``F.normalize(fc(x))``: the output is a function of the
    class scores alone (with parameters of its own, a learnt temperature); ``x + fc(x)`` is not.
    """
    stop = scores.grad_fn
    if stop is None:
        return False
    upstream, reached = _graph_leaves(before), False
    for fn in _graph_nodes(target, stop):
        reached = reached or fn is stop
        variable = getattr(fn, "variable", None)
        if variable is not None and id(variable) in upstream:
            return False
    return reached


def _same_tensor(a: object, b: object) -> bool:
    """The same tensor (object or memory view), not merely equal values."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return False
    return a is b or (a.shape == b.shape and a.stride() == b.stride() and a.data_ptr() == b.data_ptr())


# ----------------------------------------------------------------------------- the probe
class _Trace:
    """Hooks on every module of a net recording one forward: call order, Linear inputs, outputs."""

    def __init__(self, net: nn.Module):
        self.net = net
        self.names = {m: n for n, m in net.named_modules()}
        self.events: list[tuple[str, nn.Module]] = []  # ("start" | "end", module) in execution order
        self.inputs: dict[nn.Module, object] = {}  # last input of each Linear and Conv2d
        self.outputs: dict[nn.Module, object] = {}  # last output of each module
        self.versions: dict[nn.Module, int] = {}  # its in-place version counter when the module returned it

    def _start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.events.append(("start", module))
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            self.inputs[module] = args[0] if args else next(iter(kwargs.values()), None)

    def _end(self, module: nn.Module, args: tuple, output: object) -> None:
        self.events.append(("end", module))
        self.outputs[module] = output
        if isinstance(output, torch.Tensor):
            self.versions[module] = output._version

    def modified_later(self, module: nn.Module) -> bool:
        """Whether ``module``'s output was changed in place after it returned (an in-place activation)."""
        out = self.outputs.get(module)
        return isinstance(out, torch.Tensor) and out._version != self.versions.get(module)

    def run(self, x: torch.Tensor, input_name: str | None, training: bool = False) -> object:
        """One forward in eval mode with autograd on (``training``: in training mode without autograd, as BYOL's
        target pass, torch's CPU and CUDA generators forked and given back); training flags restored, hooks removed."""
        handles = []
        for m in self.net.modules():
            if isinstance(m, torch.jit.ScriptModule):  # takes no hooks: a scripted part of the net is not traced
                continue
            handles.append(m.register_forward_pre_hook(self._start, with_kwargs=True))
            handles.append(m.register_forward_hook(self._end))
        try:
            if not training:
                with saved_modes(self.net), torch.enable_grad():
                    return call_net(self.net, x, input_name)
            devices = [x.device.index or 0] if x.device.type == "cuda" else []
            with saved_modes(self.net, eval_mode=False), torch.no_grad(), torch.random.fork_rng(devices=devices):
                self.net.train(True)
                return call_net(self.net, x, input_name)
        finally:
            for h in handles:
                h.remove()

    def ran(self, module: nn.Module, kind: str) -> bool:
        return any(k == kind and m is module for k, m in self.events)

    def unfinished(self) -> nn.Module | None:
        """The innermost module that started and did not return (where a forward that raised failed)."""
        open_modules: list[nn.Module] = []
        for kind, m in self.events:
            if kind == "start":
                open_modules.append(m)
            elif open_modules and open_modules[-1] is m:
                open_modules.pop()
        return next((m for m in reversed(open_modules) if self.names.get(m)), None)

    def candidates(self, batch: int, limit: int = _CANDIDATES) -> list[tuple[str, int]]:
        """(name, pooled width) of the modules whose output pool_hidden takes, last to run first."""
        found: list[tuple[str, int]] = []
        seen: set[nn.Module] = set()
        for kind, m in reversed(self.events):
            if kind != "end" or m is self.net or m in seen:
                continue
            seen.add(m)
            width = _pooled_width(self.outputs.get(m), batch)
            if width is not None:
                found.append((self.names[m], width))
            if len(found) == limit:
                break
        return found


def _classifier_like(module: nn.Module, output: object) -> bool:
    """A Linear, or a 1x1 convolution over 1x1 maps (a classifier written as a conv, e.g. DLA's)."""
    if isinstance(module, nn.Linear):
        return True
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == (1, 1)
        and isinstance(output, torch.Tensor)
        and output.ndim == 4
        and output.shape[2:] == (1, 1)
    )


def _tolerance(dtype: torch.dtype, floor: float) -> float:
    """How exact a comparison of a net's outputs can be: 8 units of its float type's precision, at least ``floor``."""
    return max(floor, 8 * torch.finfo(dtype).eps)


def _probabilities_of(target: torch.Tensor, scores: torch.Tensor) -> bool:
    """Whether (B, K) ``target`` is ``softmax`` or ``log_softmax`` of the (B, K) class ``scores`` at some temperature.

    Its rows must be (log-)probabilities, and their log-probabilities, centred per row, the
    centred scores times one positive factor (``softmax(fc(x) / T)``), to within the net's own
    precision (a bfloat16 net's rows are only as exact as bfloat16). Checked in float64.
    """
    if target.ndim != 2 or target.shape[1] < 2 or not target.is_floating_point():
        return False
    if scores.numel() != target.numel() or not scores.is_floating_point():
        return False
    eps = _tolerance(target.dtype, 1e-4)
    with torch.no_grad():
        # On the CPU: the probe runs on the net's device, and MPS has no float64.
        t, z = target.detach().cpu().double(), scores.detach().cpu().double().reshape(target.shape)
        ones = torch.ones(len(t), dtype=t.dtype)
        rows = max(1e-3, t.shape[1] * eps)
        if bool((t <= 0).all()) and torch.allclose(t.exp().sum(1), ones, rtol=0, atol=rows):
            log_p = t  # log_softmax
        elif bool((t > 0).all()) and torch.allclose(t.sum(1), ones, rtol=0, atol=rows):
            log_p = t.log()  # softmax (a probability that underflowed to 0 is not told apart)
        else:
            return False
        a, b = log_p - log_p.mean(1, keepdim=True), z - z.mean(1, keepdim=True)
        scale = float((a * b).sum() / (b * b).sum().clamp_min(1e-30))
        tolerance = eps * max(1.0, float(log_p.abs().max()))
        return scale > 0 and torch.allclose(a, scale * b, rtol=0, atol=tolerance)


def _declared_classes(net: nn.Module) -> int | None:
    """The class count a net declares: ``num_classes`` (timm, torchvision) or ``config.num_labels`` (transformers)."""
    for owner, attribute in ((net, "num_classes"), (getattr(net, "config", None), "num_labels")):
        value = getattr(owner, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _averaged_conv_classifier(trace: _Trace, target: torch.Tensor) -> nn.Module | None:
    """The last Conv2d to run, when it is a classifier written as a convolution over the map, then averaged.

    SqueezeNet's and NiN's: the net declares K classes (``_declared_classes``), the (B, K)
    output is the conv's (B, K, H, W) output averaged over the map (after a ReLU or not), so
    the representation is the conv's input. Without a declared class count, an output pooled
    from a convolution is taken for features, as before.
    """
    if target.ndim != 2 or not target.is_floating_point() or _declared_classes(trace.net) != target.shape[1]:
        return None
    convs = [m for kind, m in trace.events if kind == "end" and isinstance(m, nn.Conv2d)]
    out = trace.outputs.get(convs[-1]) if convs else None
    if not isinstance(out, torch.Tensor) or not out.is_floating_point() or out.ndim != 4:
        return None
    if tuple(out.shape[:2]) != tuple(target.shape):
        return None
    with torch.no_grad():
        t, z = target.detach().cpu().double(), out.detach().cpu().double()  # MPS has no float64
        tolerance = _tolerance(target.dtype, 1e-5) * max(1.0, float(t.abs().max()))
        if any(torch.allclose(a.mean((2, 3)), t, rtol=0, atol=tolerance) for a in (z, z.clamp_min(0))):
            return convs[-1]
    return None


def _find_classifier(trace: _Trace, target: torch.Tensor) -> tuple[nn.Module, bool] | None:
    """(module, use_input) of the representation the final classifier Linear(s) read.

    The output is a classifier's when it equals (up to a flatten) the output of the last
    Linear or 1x1 convolution over 1x1 maps to run, not changed in place after it (a conv
    head followed by an in-place activation is part of the representation). Otherwise, when the last Linears to
    run (two or more) all have the output's batch and width (per token too: VOLO's
    token head, max-reduced) and the output depends on each, they are heads combined:
    their shared input, else what :func:`_before_heads` finds.
    """
    single = [m for kind, m in trace.events if kind == "end" and _classifier_like(m, trace.outputs.get(m))]
    last = trace.outputs.get(single[-1]) if single else None
    # a 1x1 conv head + in-place activation is not a classifier: its output must be as it left the module
    if isinstance(last, torch.Tensor) and not trace.modified_later(single[-1]):
        if last is target or (last.numel() == target.numel() and torch.equal(last.reshape(target.shape), target)):
            return single[-1], True
        if _probabilities_of(target, last) and id(getattr(single[-1], "weight", None)) in _graph_leaves(target):
            return single[-1], True  # class scores turned into (log-)probabilities: F.log_softmax(fc(x))
        if (
            target.ndim == 2
            and last.shape == target.shape
            and _declared_classes(trace.net) == target.shape[1]  # scores: tanh(fc(x)) of a headless net is features
            and _only_through(target, last, trace.inputs.get(single[-1]))
        ):
            return single[-1], True  # a function of the class scores alone: sigmoid(fc(x)), fc(x) / T
    averaged = _averaged_conv_classifier(trace, target)
    if averaged is not None:
        return averaged, True
    linears = [m for kind, m in trace.events if kind == "end" and isinstance(m, nn.Linear)]
    heads: list[nn.Module] = []  # the last Linears to run with the output's width, last first
    for m in reversed(linears):
        out = trace.outputs.get(m)
        if m in heads:
            continue
        if not isinstance(out, torch.Tensor) or out.shape[:1] + out.shape[-1:] != target.shape[:1] + target.shape[-1:]:
            break
        heads.append(m)
    if len(heads) < 2:
        return None
    reached = _graph_leaves(target)  # the output must depend on every head
    if not all(id(h.weight) in reached for h in heads):
        return None
    heads.reverse()
    inputs = [trace.inputs.get(h) for h in heads]
    if all(_same_tensor(inputs[0], other) for other in inputs[1:]):
        return heads[0], True
    widths = [getattr(h, "in_features", None) for h in heads]
    if len(set(widths)) > 1:  # a sweep: CrossViT's two branches, EfficientViM's head per stage; the layer of the
        # first head's width was one branch alone (94% of EfficientViM got no gradient)
        names = ", ".join(repr(trace.names[h]) for h in heads[:4]) + (", ..." if len(heads) > 4 else "")
        raise ValueError(
            f"the net combines {len(heads)} classifier heads ({names}) whose inputs differ in width "
            f"({', '.join(map(str, widths[:4]))}): no one layer holds the representation they share; build the net "
            "without its classifiers (timm: num_classes=0), whose output BYOL then takes, or pass hidden_layer= "
            "naming the layer to train on"
        )
    return _before_heads(trace, heads)


def _before_heads(trace: _Trace, heads: list[nn.Module]) -> tuple[nn.Module, bool] | None:
    """The last module output before the heads' branches started whose pooled width is theirs.

    A head's branch is its highest ancestor that holds no other head (``classifier`` for
    ``classifier.linear`` after ``classifier.norm``). A module whose output is one head's
    input is that head's branch and is passed over (PiT's dropout, run on the class token,
    then on the distillation token: its hook would see the last alone).
    """
    head_names = [trace.names[h] for h in heads]
    starts = []
    for name in head_names:
        root = name
        while "." in root:
            parent = root.rsplit(".", 1)[0]
            if any(other != name and other.startswith(parent + ".") for other in head_names):
                break
            root = parent
        module = trace.net.get_submodule(root)
        starts.append(max(i for i, (k, m) in enumerate(trace.events) if k == "start" and m is module))
    width = getattr(heads[0], "in_features", None)
    inputs = [i for i in (trace.inputs.get(h) for h in heads) if isinstance(i, torch.Tensor)]

    def feeds_one_head(out: object) -> bool:  # a head's own branch (PiT's dropout of one token), not what all read
        return isinstance(out, torch.Tensor) and any(i.shape == out.shape and torch.equal(i, out) for i in inputs)

    for kind, m in reversed(trace.events[: min(starts)]):
        if kind != "end" or m is trace.net or feeds_one_head(trace.outputs.get(m)):
            continue
        if _pooled_width(trace.outputs.get(m), _PROBE_BATCH) == width:
            return m, False
    return None


def _is_channels_last(hidden: torch.Tensor, image_size: tuple[int, int]) -> bool:
    """Whether a 4D map is (B, H, W, C): its dims 1, 2 (and not 2, 3) are the image's grid at some stride.

    A feature grid of an (h, w) image at stride s is about (h / s, w / s): no larger than the
    image, with the image's aspect ratio to within a cell. (B, C, H, W) is kept whenever dims 2
    and 3 fit, so only a map whose last dim cannot be a grid side (timm's Swin: (B, 7, 7, 768)
    for 224 px) reads as channels last.
    """

    def grid(a: int, b: int) -> bool:
        # Each side rounds to within a cell of its own, which the other side's ratio scales.
        h, w = image_size
        if not (1 <= a <= h and 1 <= b <= w):
            return False
        return abs(b - a * w / h) <= 1 + w / h + 1e-9 or abs(a - b * h / w) <= 1 + h / w + 1e-9

    shape = hidden.shape
    return grid(shape[1], shape[2]) and not grid(shape[2], shape[3])


def _random_in_eval(
    net: nn.Module,
    x: torch.Tensor,
    input_name: str | None,
    module: nn.Module | None,
    use_input: bool,
    key: OutputKey,
    hidden: object,
    pool: Callable[[torch.Tensor], torch.Tensor],
) -> bool:
    """Whether a second eval-mode call on the same probe batch gives another representation (a random net).

    The pooled representations are compared: a net may reorder tokens at random (ViTMAE with
    ``mask_ratio=0`` shuffles its patches) without changing what ``pool`` makes of them.
    """
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point() or hidden.is_meta:
        return False  # a meta net has no values to compare
    seen: list[object] = []
    handle = None
    if module is not None:
        if use_input:
            handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0] if args else None))
        else:
            handle = module.register_forward_hook(lambda m, args, out: seen.append(out))
    try:
        with saved_modes(net), torch.no_grad():
            out = call_net(net, x, input_name)
        # the last call of a module run several times, as the probe's trace keeps
        again = (seen[-1] if seen else None) if module is not None else select_output(out, key)
        if not isinstance(again, torch.Tensor) or again.shape != hidden.shape:
            return False
        first, second = pool(hidden.detach()).float(), pool(again).float()
        tolerance = _tolerance(hidden.dtype, 1e-3)  # a bfloat16 net's kernels with and without autograd differ more
        scale = max(0.1, float(first.abs().max()))
        return not torch.allclose(first, second, rtol=tolerance, atol=tolerance * scale)
    except Exception:  # the first call ran: a failure now is not this check's to report
        return False
    finally:
        if handle is not None:
            handle.remove()


def _run_probe(trace: _Trace, x: torch.Tensor, input_name: str | None) -> object:
    try:
        return trace.run(x, input_name)
    except Exception as err:
        call = f"net({input_name}=x)" if input_name else "net(x)"
        hint = (
            " If the net takes the image by keyword, pass input_name='...' to BYOL"
            if isinstance(err, TypeError) and input_name is None
            else ""
        )
        built = _declared_size(trace.net)
        if built is not None and built != tuple(x.shape[-2:]) and _runs_at(trace.net, x, built, input_name):
            fix = (
                f" {type(trace.net).__name__} is built for {built[0]}x{built[1]} images and the views are "
                f"{x.shape[-2]}x{x.shape[-1]}: pass image_size={built[0] if built[0] == built[1] else built} to "
                "BYOL, or build the net for the views' size ("
                + ("its config's image_size" if hasattr(trace.net, "config") else "timm.create_model(..., img_size=)")
                + ")"
            )
        else:
            fix = (
                " Check image_size and the channel count (pass channels=... if the net does not start with a "
                "convolution)"
            )
        raise ValueError(
            f"could not run {type(trace.net).__name__} as {call} on a probe batch of shape {tuple(x.shape)}: "
            f"{str(err).rstrip('.')}.{fix}.{hint}"
        ) from err


def _runs_at(net: nn.Module, x: torch.Tensor, size: tuple[int, int], input_name: str | None) -> bool:
    """Whether ``net`` runs on ``x``'s batch at ``size``: the size, not the channels, is what failed (a ViT's
    fixed grid of patches; a ConvNeXt config's ``image_size`` is a default it does not hold to)."""
    try:
        with saved_modes(net), torch.no_grad():
            call_net(net, x.new_zeros((*x.shape[:-2], *size)), input_name)
        return True
    except Exception:
        return False


def _declared_size(net: nn.Module) -> tuple[int, int] | None:
    """(H, W) a net says it is built for and holds to: a transformers config's ``image_size``, or timm's patch
    embedding with a fixed grid (``strict_img_size``); None when it declares none or takes any size."""
    embed = getattr(net, "patch_embed", None)
    size = getattr(embed, "img_size", None) if getattr(embed, "strict_img_size", False) else None
    if size is None and not getattr(embed, "dynamic_img_size", False):
        config = getattr(net, "config", None)
        size = getattr(config, "image_size", None) if config is not None else None
    if isinstance(size, int) and not isinstance(size, bool):
        return (size, size)
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) for v in size):
        return (int(size[0]), int(size[1]))
    return None


def _auto_choice(
    trace: _Trace, out: object, image_size: tuple[int, int]
) -> tuple[str, nn.Module | None, bool, OutputKey]:
    """(name, module, use_input, output_key) of the automatic hidden layer; see the module docstring."""
    target = _classifier_target(out)
    found = _find_classifier(trace, target) if target is not None else None
    if found is None:  # class scores named last_hidden_state (transformers' PPLCNetForImageClassification)
        state = dict(_entries(out) or []).get("last_hidden_state")
        if isinstance(state, torch.Tensor) and state.ndim == 2 and state.shape[1] == _declared_classes(trace.net):
            found = _find_classifier(trace, state)
    if found is not None:
        module, use_input = found
        return trace.names[module], module, use_input, None
    _no_scripted_classifier(trace.net)
    key = _representation_key(out, image_size)
    return _key_name(key), None, False, key


def _no_scripted_classifier(net: nn.Module) -> None:
    """No classifier was found: one the probe cannot see into (a TorchScript ``Linear``) would make "auto" take
    the class scores as the representation (the review), so such a net names its hidden layer (ValueError)."""
    scripted = [
        name
        for name, m in net.named_modules()
        if isinstance(m, torch.jit.ScriptModule) and getattr(m, "original_name", "") == "Linear"
    ]
    if scripted:
        raise ValueError(
            f"the net holds TorchScript Linear layers ({', '.join(map(repr, scripted[:3]))}), which take no hooks, "
            "so 'auto' cannot tell whether one is the classifier: pass hidden_layer= naming the eager layer whose "
            "output is the representation (e.g. the pooling before the classifier), or build the net without "
            "torch.jit.script"
        )


def _with_candidates(trace: _Trace, problem: str, image_size: tuple[int, int], input_name: str | None) -> str:
    """``problem`` followed by the layers that would work and a call that uses the first."""
    found = trace.candidates(_PROBE_BATCH)
    if not found:
        return (
            f"{problem}. No module of {type(trace.net).__name__} produces a (B, D), (B, N, D) or "
            "(B, C, H, W) tensor either: wrap the net in a module that returns one"
        )
    listing = ", ".join(f"{name!r} (D={width})" for name, width in found)
    size = image_size[0] if image_size[0] == image_size[1] else image_size
    extra = f", input_name={input_name!r}" if input_name else ""
    return (
        f"{problem}. Layers whose output works, last to run first: {listing}; "
        f'e.g. BYOL(net, image_size={size}, hidden_layer="{found[0][0]}"{extra})'
    )


def _positive_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def infer_channels(net: nn.Module) -> int:
    """The input channels the net declares, else those of its first convolution (3 when there is none).

    Declared: timm models keep their constructor's ``in_chans``, Hugging Face models their
    ``config.num_channels``. They win over the first convolution, which can follow a
    rearrangement of the input (TResNet's space-to-depth stem sees 16x the channels).
    """
    declared = _positive_int(getattr(net, "in_chans", None))
    declared = declared or _positive_int(getattr(getattr(net, "config", None), "num_channels", None))
    if declared:
        return declared
    for module in net.modules():
        channels = getattr(module, "in_channels", None)
        if isinstance(module, nn.modules.conv._ConvNd) and isinstance(channels, int):
            return channels
    return 3


def _named_module(net: nn.Module, module: nn.Module) -> tuple[str, nn.Module | None]:
    """(name, module) of a submodule given as an object; the net itself stands for its output."""
    if module is net:
        return _OUTPUT, None
    for name, candidate in net.named_modules(remove_duplicate=False):
        if candidate is module and name:
            return _hookable(name, module)  # a module reached by two names: the first, as named_modules lists it
    raise ValueError(
        f"the {type(module).__name__} given as hidden_layer is not a submodule of the {type(net).__name__} "
        "wrapped (a copy of the net, or a module of another one?); pass one of net's own modules "
        "(e.g. net.layer4), its name from net.named_modules(), or 'auto'"
    )


def layer_by_name(net: nn.Module, hidden_layer: HiddenLayer) -> HiddenLayer:
    """A ``hidden_layer`` given as a module, as its name in ``net`` (-1 for the net itself); any other form as is.

    For code that changes the net's modules before ``BYOL`` sees it (``convert_sync_batchnorm`` replaces
    every BatchNorm): the name still finds the layer.
    """
    if not isinstance(hidden_layer, nn.Module):
        return hidden_layer
    name, _ = _named_module(net, hidden_layer)
    return -1 if name == _OUTPUT else name


def _resolve_layer(net: nn.Module, hidden_layer: HiddenLayer) -> tuple[str, nn.Module | None]:
    """Map a user's hidden_layer to (name, module); module None means the net's output."""
    if hidden_layer is None or (isinstance(hidden_layer, str) and hidden_layer == "auto"):
        return "auto", None
    if isinstance(hidden_layer, nn.Module):
        return _named_module(net, hidden_layer)
    if not isinstance(hidden_layer, (bool, int, str)) and hasattr(type(hidden_layer), "__index__"):
        hidden_layer = operator.index(hidden_layer)  # a numpy integer
    if isinstance(hidden_layer, bool) or not isinstance(hidden_layer, (int, str)):
        raise TypeError(
            f"hidden_layer must be a module name (str), a child index (int), a submodule of the net "
            f"or 'auto', got {type(hidden_layer).__name__}"
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
        return _hookable(*children[hidden_layer])
    modules = dict(net.named_modules())
    if hidden_layer in modules and hidden_layer != "":
        return _hookable(hidden_layer, modules[hidden_layer])
    module_names = [n for n in modules if n]
    close = difflib.get_close_matches(hidden_layer, module_names, n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    top = ", ".join(repr(n) for n, _ in net.named_children())
    raise ValueError(
        f"hidden layer {hidden_layer!r} not found in {type(net).__name__}; {hint}"
        f"top-level modules: {top}. Pass a name from net.named_modules(), a child index, "
        "-1 for the net's output, or 'auto'"
    )


def _hookable(name: str, module: nn.Module) -> tuple[str, nn.Module]:
    """A named hidden layer that can take BYOL's hook: not a TorchScript module (ValueError)."""
    if isinstance(module, torch.jit.ScriptModule):
        raise ValueError(
            f"hidden layer {name!r} is a TorchScript module ({type(module).__name__}), which takes no hooks: name an "
            "eager layer of the net, or build the net without torch.jit.script and script it after training"
        )
    return name, module


def _probe_image(channels: int, image_size: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A fixed, non-constant probe batch in [-0.5, 0.5), drawn without the RNG.

    A zero image makes layer-normed tokens vanish and distinct heads produce equal
    logits; a golden-ratio sequence is deterministic and has no such ties.
    """
    count = _PROBE_BATCH * channels * image_size[0] * image_size[1]
    values = torch.arange(count, dtype=torch.float64).mul_(0.6180339887498949).remainder_(1.0).sub_(0.5)
    values = values.reshape(_PROBE_BATCH, channels, *image_size)
    return values.to(dtype=dtype).to(device)  # cast on the CPU: MPS has no float64


def _probe_copy(net: nn.Module, need_copy: bool) -> nn.Module:
    """The net the probe runs: a deep copy, so that not even a cache in the user's net changes.

    A net that cannot be copied is probed in place (flags restored), unless ``need_copy`` (BYOL's
    target network is a deep copy): then a ``TypeError`` naming the fix, before anything ran.
    """
    try:
        return deepcopy_module(net)
    except Exception as error:
        if need_copy:
            raise TypeError(
                f"the net cannot be deep-copied ({type(error).__name__}: {error}), and BYOL's target network is its "
                "deep copy: keep objects that cannot be copied (locks, open files, processes) out of the module or "
                "give it a __deepcopy__, or pass use_momentum=False (SimSiam: no target network)"
            ) from error
        return net


def _warn_if_run_again(trace: _Trace, module: nn.Module, name: str, use_input: bool) -> None:
    """A named hidden layer that runs more than once per forward (a shared pooling module) is captured at its
    last call: a warning says so, since the features may come from an earlier one."""
    kind = "start" if use_input else "end"
    calls = sum(1 for k, m in trace.events if k == kind and m is module)
    if calls > 1:
        warnings.warn(
            f"hidden layer {name!r} runs {calls} times in one forward of {type(trace.net).__name__}; the "
            "representation is its last call's output. If the features come from an earlier call (a module shared "
            "by two branches), hook a module that runs once there (an nn.Identity() placed after the features)",
            UserWarning,
            stacklevel=4,  # BYOL(...)'s caller
        )


def probe_backbone(
    net: nn.Module,
    image_size: tuple[int, int],
    channels: int,
    hidden_layer: HiddenLayer,
    token_pool: str = "mean",
    input_name: str | None = None,
    need_copy: bool = False,
) -> BackboneProbe:
    """Run the net once to find the hidden layer, its width and the unused parameters.

    The forward runs on a deep copy of the net, in eval mode, with autograd on (the
    parameters the representation depends on are read off its graph), on a fixed image;
    no random number is drawn: the user's net, its buffers, caches and training flags
    and the RNG stream are untouched. The copy then runs once in training mode, as BYOL
    trains it (torch's CPU and CUDA generators forked and given back), so that a part
    that runs only in training and fails there is named now (not for a net with
    SyncBatchNorm, whose training forward needs a GPU and collectives).

    Args:
        net: the backbone.
        image_size: (H, W) of the training views.
        channels: input channels.
        hidden_layer: see the module docstring.
        token_pool: pooling of token sequences.
        input_name: the keyword the net takes the image by; None detects it
            (:func:`detect_input_name`).
        need_copy: the net must be deep-copyable (BYOL's target network): a ``TypeError``
            before the probe when it is not; otherwise it is probed in place.

    Returns:
        The :class:`BackboneProbe`; its ``module`` is the user's (not the copy's).

    Raises:
        ValueError: the layer is not found, never runs, the probe forward fails (in eval
            or in training mode), or the representation has a shape that cannot be pooled
            (with the layers that would work).
        TypeError: the representation is not a tensor (with the layers that would work),
            ``input_name`` is not a str, or (``need_copy``) the net cannot be deep-copied.
    """
    if input_name is not None and not isinstance(input_name, str):
        raise TypeError(f"input_name must be None or a str such as 'pixel_values', got {type(input_name).__name__}")
    if input_name is not None and not input_name.isidentifier():
        raise ValueError(f"input_name must be a keyword name such as 'pixel_values', got {input_name!r}")
    if input_name is not None:
        _check_keyword(net, input_name)
    name, module = _resolve_layer(net, hidden_layer)
    call_name = input_name if input_name is not None else detect_input_name(net)
    device, dtype = module_device_dtype(net)
    copied = _probe_copy(net, need_copy)
    trace = _Trace(copied)
    x = _probe_image(channels, image_size, device, dtype)
    out = _run_probe(trace, x, call_name)
    use_input, key = False, None
    if name == "auto":
        name, module, use_input, key = _auto_choice(trace, out, image_size)
        if module is not None and use_input and _first_layer(trace, module, (copied, net)):  # the classifier's input: x
            module, use_input, key = None, False, _representation_key(out, image_size)
            name = _key_name(key)
    elif module is None:  # -1: the net's output, or its representation entry
        key = _representation_key(out, image_size)
        name = _key_name(key)
    else:
        module = copied.get_submodule(name)
        _warn_if_run_again(trace, module, name, use_input)
    if module is None:
        hidden = select_output(out, key)
    elif trace.ran(module, "start" if use_input else "end"):
        hidden = trace.inputs[module] if use_input else trace.outputs[module]
    else:
        raise ValueError(
            f"hidden layer {name!r} exists but never ran during the forward pass of "
            f"{type(net).__name__}{checkpointing_hint(net)}; pick a layer on the forward path"
        )
    if isinstance(hidden, torch.Tensor) and hidden.ndim in (3, 4) and hidden.shape[0] != _PROBE_BATCH:
        problem = (
            f"hidden layer {name!r} produced a tensor of shape {tuple(hidden.shape)} for {_PROBE_BATCH} images: "
            "its first dimension is not the batch (a sequence-first (N, B, D) layer?)"
        )
        raise ValueError(_with_candidates(trace, problem, image_size, input_name))
    channels_last = isinstance(hidden, torch.Tensor) and hidden.ndim == 4 and _is_channels_last(hidden, image_size)
    try:
        pooled = pool_hidden(hidden, token_pool, layer=f"hidden layer {name!r}", advice="", channels_last=channels_last)
        dim = pooled.shape[-1]
    except (TypeError, ValueError) as err:
        message = _with_candidates(trace, str(err).rstrip(". ;"), image_size, input_name)
        raise type(err)(message) from None
    if not _trains_net((copied, net), hidden):
        where = f"the input of {name!r}" if use_input else f"hidden layer {name!r}"
        raise ValueError(
            f"{where} of {type(net).__name__} depends on none of its trainable parameters (the layers before it "
            "are frozen, requires_grad=False, run under torch.no_grad() or detached, or there are none): BYOL would "
            "train its own heads only and leave the net as it is; unfreeze the layers before it "
            "(requires_grad_(True)) or pick a later hidden_layer"
        )
    used = _graph_leaves(hidden)
    unused = tuple(n for n, p in copied.named_parameters() if p.requires_grad and id(p) not in used)
    pool = functools.partial(pool_hidden, token_pool=token_pool, layer="", advice="", channels_last=channels_last)
    if _random_in_eval(copied, x, call_name, module, use_input, key, hidden, pool):
        warnings.warn(
            f"{type(net).__name__} gives other outputs at {name!r} for the same images on a second call in eval "
            "mode: it draws random numbers outside training (a masked autoencoder's mask_ratio, say), so its "
            "embeddings, kNN accuracies and exports are random; configure it not to (ViTMAE: mask_ratio=0.0)",
            UserWarning,
            stacklevel=3,  # BYOL(...)'s caller
        )
    synced = any(isinstance(m, nn.SyncBatchNorm) for m in copied.modules())  # training mode: a GPU and collectives
    if copied is not net and not synced:  # a net probed in place is not run again: its statistics would change
        _check_training_forward(copied, x, call_name, image_size)
    original = None if module is None else net.get_submodule(trace.names[module])
    return BackboneProbe(name, original, use_input, int(dim), unused, key, call_name, channels_last)


def _trains_net(nets: tuple[nn.Module, ...], hidden: object) -> bool:
    """Whether ``hidden`` depends on a trainable parameter of the net (True for a net with none: a frozen net).

    ``nets``: the probe's copy and the user's net: a hook copied with the net may still close over the
    original's parameters (``lambda m, a: a[0] @ net.A``), which the probe's graph then reaches instead.
    """
    trainable = {id(p) for net in nets for p in net.parameters() if p.requires_grad}
    return not trainable or bool(trainable & _graph_leaves(hidden))


def _first_layer(trace: _Trace, module: nn.Module, nets: tuple[nn.Module, ...]) -> bool:
    """Whether ``module`` takes the images themselves: no module with parameters returned before it started, and its
    input depends on no trainable parameter (``nn.Sequential(nn.Flatten(), nn.Linear(...))``)."""
    for kind, other in trace.events:
        if kind == "start" and other is module:
            break
        if kind == "end" and next(other.parameters(recurse=False), None) is not None:
            return False
    return not _trains_net(nets, trace.inputs[module]) or not any(p.requires_grad for p in nets[0].parameters())


def _check_training_forward(copied: nn.Module, x: torch.Tensor, call_name: str | None, image_size: tuple) -> None:
    """Run the probe's copy once in training mode, as BYOL's target pass runs it (``_Trace.run(training=True)``): a
    part that runs only in training and fails there (torchvision's Inception v3 auxiliary classifier below 299 px)
    is a ``ValueError`` naming that part now, not the first training step's error."""
    trace = _Trace(copied)
    try:
        trace.run(x, call_name, training=True)
    except Exception as error:
        inner = trace.unfinished()
        where = f" in {trace.names[inner]!r} ({type(inner).__name__})" if inner is not None else ""
        raise ValueError(
            f"{type(copied).__name__} runs in eval mode but fails in training mode, as BYOL trains it, on a probe "
            f"batch of shape {tuple(x.shape)}{where}: {error}. If that part runs only in training (an auxiliary "
            f"classifier, say), it may not fit image_size {tuple(image_size)}: leave it out when building the net "
            "(torchvision's inception_v3: aux_logits=False) or use a larger image_size"
        ) from error
