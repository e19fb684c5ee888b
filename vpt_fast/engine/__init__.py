"""The single-pass VPT engine: continuous batching over a paged KV cache."""

from .async_engine import AsyncEngine, EngineClosed, QueueFull, RequestHandle, RequestRejected
from .scheduler import Engine, EngineDead, GraphCapture
from .state import FinishEvent, GenerationResult, PerceptionEvent, PerceptionTrace, TokenEvent

__all__ = ["AsyncEngine", "Engine", "EngineClosed", "EngineDead", "FinishEvent", "GenerationResult", "GraphCapture",
           "PerceptionEvent", "PerceptionTrace", "QueueFull", "RequestHandle", "RequestRejected", "TokenEvent"]
