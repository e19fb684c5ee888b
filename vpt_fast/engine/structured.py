"""Structured outputs: the answer's tokens constrained by a grammar, with xgrammar.

A request's `SamplingParams.structured` (a JSON object, a JSON schema, a choice among
strings, a regular expression or an EBNF grammar) is compiled once per engine and kind
(xgrammar keeps compiled grammars), when the request is prepared: a grammar that cannot
compile fails that request alone, with xgrammar's message. At every step, each constrained
row's allowed tokens are written into one bitmask for the batch (a bit per vocabulary
entry, 32 to an int32 word), which the sampler applies on the device before anything else;
the chosen token then advances the row's matcher. A round ends at `<|im_end|>` only once the
grammar is complete.

The VPT rule: the constraint is on the answer. Where round 1 begins, a VPT model may still
ask for a perception: the tokens that open a perception request the engine serves
(`<|region_start|>`, and `<|X_action_start|>` of each re-encoding kind it has the branch of) are allowed beside what the
grammar allows. When round 1 opens with one, the rest of round 1 (the perception request) is
not constrained and the answer after the perception is, from its first token; when round 1
opens with anything else, round 1 is the answer and is constrained to its end. A request
without an image cannot ask for a perception: its answer is constrained from round 1's first
token. The VPT tokens and image pads are never allowed inside a constrained answer (a
grammar would read their text as text). Round-1
tokens scripted with forced tokens are not chosen, but they are checked: scripted answer
tokens the grammar refuses end the request with an error.

JSON is written compactly (no whitespace between tokens of the JSON syntax: xgrammar's
`any_whitespace=False`), which keeps a model from running on in whitespace.
"""

from __future__ import annotations

import json
import re
import threading

import torch

from ..sampling import StructuredOutput


_LOCATION = re.compile(r"^(\[[\d:]+\] )?\S+\.cc:\d+: (Check failed: \(.*?\) is false: )?")


def _xgrammar():
    try:
        import xgrammar
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise ValueError(f"structured outputs need the xgrammar package ({e})") from None
    return xgrammar


class GrammarBook:
    """Compiles structured-output specs against one tokenizer and model vocabulary."""

    def __init__(self, tokenizer, vocab_size: int, stop_id: int, openers: frozenset[int], reserved: frozenset[int]):
        """openers: the tokens that open a perception request the engine serves; reserved: the
        VPT and image tokens (their text may look like anything to a grammar), never allowed
        inside a constrained answer."""
        self.tokenizer, self.vocab_size, self.stop_id, self.openers = tokenizer, vocab_size, stop_id, openers
        self.words = -(-vocab_size // 32)
        self.keep = torch.full((self.words,), -1, dtype=torch.int32)  # the bits of tokens a grammar may allow
        for t in reserved:
            if t < vocab_size:
                self.keep[t // 32] &= ~_bit(t % 32)
        self._compiler = None
        self._lock = threading.Lock()  # the compiler is built once, by whichever thread asks first

    def compiler(self):
        with self._lock:
            if self._compiler is None:
                xgr = _xgrammar()
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=[self.stop_id])
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            return self._compiler

    def compile(self, structured: StructuredOutput):
        """The compiled grammar of a spec; ValueError naming what is wrong with it."""
        compiler = self.compiler()
        kind, spec = structured.kind, structured.spec
        try:
            if kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if kind == "json_schema":
                return compiler.compile_json_schema(spec, any_whitespace=False)
            if kind == "choice":
                body = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec)
                return compiler.compile_grammar(f"root ::= {body}")
            if kind == "regex":
                return compiler.compile_regex(spec)
            return compiler.compile_grammar(spec)
        except (RuntimeError, ValueError, TypeError) as e:
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            message = _LOCATION.sub("", message)  # xgrammar's "[time] file.cc:line: Check failed: ..."
            raise ValueError(f"the {kind.replace('_', ' ')} cannot be compiled: {message[:500]}") from None

    def constraint(self, structured: StructuredOutput) -> "Constraint":
        return Constraint(_xgrammar().GrammarMatcher(self.compile(structured)), self.openers, self.keep)


class Constraint:
    """One request's grammar state: which tokens its next one may be, and what it took."""

    def __init__(self, matcher, openers: frozenset[int] | None, keep: torch.Tensor):
        self.matcher = matcher
        self.openers = openers
        self.keep = keep
        self.free = False  # round 1 opened a perception request: unconstrained until the next round
        self.taken = 0  # tokens of this round taken so far

    @property
    def active(self) -> bool:
        return not self.free

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into bitmask[row] (int32 words, a bit per token)."""
        self.matcher.fill_next_token_bitmask(bitmask, row)
        bitmask[row] &= self.keep
        if self.taken == 0 and self.openers is not None:
            for t in self.openers:
                bitmask[row, t // 32] |= _bit(t % 32)

    def take(self, token: int) -> bool:
        """Advance over the round's next token; False when the grammar refuses it."""
        first = self.taken == 0
        self.taken += 1
        if self.free:
            return True
        if first and self.openers is not None and token in self.openers:
            self.free = True
            return True
        return self.matcher.accept_token(token)

    def fork(self) -> "Constraint":
        new = Constraint(self.matcher.fork(), self.openers, self.keep)
        new.free, new.taken = self.free, self.taken
        return new

    def next_round(self) -> None:
        """A perception was spliced in: the answer starts, constrained from its first token."""
        self.matcher.reset()
        self.free = False
        self.taken = 0
        self.openers = None  # only round 1 may open a perception


def _bit(i: int) -> int:
    """The int32 value with bit i set (bit 31 is the sign bit)."""
    return (1 << i) - (1 << 32 if i == 31 else 0)


def unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, vocab) bool of what a (B, words) int32 bitmask allows."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    return ((bitmask[:, :, None] >> shifts) & 1).bool().reshape(bitmask.shape[0], -1)[:, :vocab]
