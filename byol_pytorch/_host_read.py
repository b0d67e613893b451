"""Reading a small device tensor on the host without waiting for the device: the deferred read.

The live checks of a training step (the non-finite flags of ``BYOL``, the collapse monitor's
figures) are written on the device by tensor ops. Reading them at once would make every step wait
for the device (a host sync). ``DeferredRead.poll`` instead starts a non-blocking copy into pinned
memory and reads an earlier copy once its CUDA event says it has landed: the figures arrive a
step or so late, never by blocking. On the CPU the value is read at once (it costs nothing);
on other accelerators nothing is read.

The copy runs on the current stream of the tensor's own device and the event is recorded on that
same stream, inside that device's context: with the learner on ``cuda:1`` and the current device
``cuda:0`` the event still completes only after the copy, and no context is created on GPU 0.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["DeferredRead"]


class DeferredRead:
    """Non-blocking host reads of one small device tensor at a time (module doc).

    Examples:
        >>> reader = DeferredRead()
        >>> reader.poll(torch.tensor([1.0, 2.0]))  # on the CPU: the values now
        [1.0, 2.0]
    """

    def __init__(self) -> None:
        self._in_flight: tuple[Tensor, Any] | None = None  # (pinned copy, CUDA event)

    def poll(self, tensor: Tensor) -> list | None:
        """The values of ``tensor`` as of an earlier call (CUDA) or now (CPU); None while none has landed.

        On CUDA: returns the copy started by an earlier call once its event has completed (else
        None) and starts a new copy when none is in flight. Never waits for the device.
        """
        if tensor.device.type == "cpu":
            return tensor.tolist()
        values = None
        if self._in_flight is not None and self._in_flight[1].query():
            values, self._in_flight = self._in_flight[0].tolist(), None
        if self._in_flight is None and tensor.device.type == "cuda":
            self._in_flight = start_copy(tensor)
        return values

    def clear(self) -> None:
        """Forget the copy in flight (an event neither copies nor pickles; the next poll starts anew)."""
        self._in_flight = None

    def __getstate__(self) -> dict[str, Any]:
        return {"_in_flight": None}


def start_copy(tensor: Tensor) -> tuple[Tensor, Any]:
    """A pinned host copy of a CUDA tensor, started without waiting, and the event that marks it done."""
    with torch.cuda.device(tensor.device):  # pinned memory and event in the tensor's own context
        stream = torch.cuda.current_stream(tensor.device)
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)  # enqueued on ``stream``, the tensor's device's current stream
        event = torch.cuda.Event()
        event.record(stream)
    return host, event
