"""The weight-sync transport interface: how the learner's weights reach the vLLM engines."""
from __future__ import annotations

from typing import ClassVar, Iterable

import torch


class Transport:
    """One way of moving weights from learner rank 0 into the engines. Each process makes its own
    instance: learner rank 0 to send; each vLLM worker of an engine to receive (rollout/vllm_ext.py
    makes it on that transport's first message). The other learner ranks send nothing: the learner
    walks the weights on them too, since ZeRO-3 gathers are collective. After `send` the learner has
    every engine load what its workers received and adopt the version (`engine.commit_weights`)."""

    name: ClassVar[str]  # its key in sync.TRANSPORTS: how an engine's worker finds its receiving end
    # Whether an engine that died can be restarted under this transport (it gets the weights by a
    # `send` to it alone), and when not, why: the engine pool (rollout/engine_pool.py) stops the
    # run with that sentence instead.
    engines_restartable: ClassVar[bool] = True
    no_restart_reason: ClassVar[str] = ""

    def __init__(self, device: torch.device, bucket_bytes: int = 0):
        self.device = device  # where this end's tensors live (the learner's device, or the worker's)
        self.bucket_bytes = bucket_bytes  # sender: the cap on one bucket (sync.bucket_bytes)

    # -- sender: learner rank 0 ------------------------------------------------------------------
    def connect(self, engines: list) -> None:
        """Once, after the engines are ready; their workers do their part in `join`, reached
        through `engine.join_transport(self.name, *args)`."""

    def send(self, weights: Iterable[tuple[str, torch.Tensor]], engines: list, version: int) -> dict:
        """Every (name, tensor) to every engine in buckets of at most `bucket_bytes` (a larger tensor
        alone), each through `engine.receive_weights(self.name, version, *message)`; returns once all
        are received: {"sync/bytes", "sync/buckets"}. A tensor is valid only until the next one is
        drawn (ZeRO-3 gathers one module at a time): copy what outlives that."""
        raise NotImplementedError

    # -- receiver: each vLLM worker of an engine -------------------------------------------------
    def join(self, *args) -> None:
        """This worker's part of `connect`, with the arguments the sender gave it."""

    def receive(self, *message) -> list[tuple[str, torch.Tensor]]:
        """One bucket's (name, tensor) pairs out of a message the sender passed to
        `engine.receive_weights`; the worker keeps them until the commit loads them."""
        raise NotImplementedError
