"""What a client keeps of one call: its inputs (:class:`Call`), the cotangents of the
kept Vjps above it (:class:`Level`) and, after a Forward (or kept Vjp) that kept state for
a backward, the handle to that state (:class:`Residual`)."""

from __future__ import annotations

import collections
import weakref
from dataclasses import dataclass
from typing import Any, Callable

from gradserve.wire.codec import Arguments


@dataclass
class Call:
    """One invocation's inputs: what Forward sends and a recomputing Vjp re-sends.

    ``requires_grad(leaf)`` flags the leaves to differentiate (None: none).
    """

    endpoint: str
    inputs: Arguments
    requires_grad: Callable[[Any], bool] | None = None


@dataclass(frozen=True)
class Level:
    """The cotangents of one kept Vjp (higher-order reverse mode): what a recompute
    replays, with the leaves ``requires_grad`` flags differentiated."""

    cotangents: Any
    batched: bool = False
    requires_grad: Callable[[Any], bool] | None = None


class Residual:
    """A handle to the state a Forward kept on a server for its Vjp.

    Holds the call's inputs so a Vjp can recompute when the server no longer
    has the residual (one with no id always recomputes), and ``holder``, the
    replica that keeps it (its Vjp goes there). Dropping the handle queues a
    Release to that replica.
    """

    def __init__(self, call: Call, residual_id: str = "",
                 release_queue: collections.deque[str] | None = None, holder: Any = None,
                 levels: tuple[Level, ...] = (), below: "Residual | None" = None):
        self.call = call
        #: the kept Vjps from the forward to this residual, lowest first (none: a Forward's)
        self.levels = levels
        #: the residual a kept Vjp made this from: held, since the server's state of this one
        #: views the request slots that one (and those below it) holds
        self.below = below
        self.id = residual_id
        #: the replica (``gradserve.client.replica.Replica``) holding it; None: none does
        self.holder = holder if residual_id else None
        self._finalizer = (weakref.finalize(self, release_queue.append, residual_id)
                           if residual_id and release_queue is not None else None)

    def detach(self) -> None:
        """Forget the server-side id (after an explicit release, or once it is lost)."""
        if self._finalizer is not None:
            self._finalizer.detach()
        self.id = ""
        self.holder = None
