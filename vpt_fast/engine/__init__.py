"""The single-pass VPT engine."""

from .generate import Engine, FinishEvent, PerceptionEvent, TokenEvent
from .state import GenerationResult, PerceptionTrace

__all__ = ["Engine", "FinishEvent", "GenerationResult", "PerceptionEvent", "PerceptionTrace", "TokenEvent"]
