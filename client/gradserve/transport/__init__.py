"""Transports: how tensor payloads travel between client and server.

A transport is a pair of small objects the codec talks to. The sending side's
``PayloadWriter.put`` fills a ``Tensor`` message's ``payload`` (inline bytes,
a stream id, later a shared-memory or CUDA IPC reference); the receiving
side's ``PayloadReader.get`` returns the bytes that payload designates. A new
transport is one new module implementing both.
"""

from __future__ import annotations

from typing import Protocol

from gradserve.frameworks import WireTensor
from gradserve.v1 import gradserve_pb2 as pb


class PayloadWriter(Protocol):
    def put(self, msg: pb.Tensor, tensor: WireTensor) -> None:
        """Set ``msg``'s payload so the peer can recover ``tensor.data``."""


class PayloadReader(Protocol):
    def get(self, msg: pb.Tensor) -> memoryview:
        """The validated bytes designated by ``msg``'s payload."""
