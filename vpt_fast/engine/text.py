"""Text of a growing list of token ids, and stop strings in it.

`IncrementalText` decodes a round's tokens as they come (special tokens left out) at a cost
per token that does not grow with the text: it decodes a short window of ids around the new
one, as vLLM's detokenizer does, and holds a character back while it is cut short (a
multi-byte character spread over tokens). `find_stop` says where the first stop string of a
text begins, and `cut_at_stop` what the text is once cut there: the engine and the server
cut with the same rule.
"""

from __future__ import annotations

WINDOW = 6  # ids before the new ones decoded with them, so that a word's spacing comes out right


def find_stop(text: str, stops: tuple[str, ...], start: int = 0) -> tuple[int, str] | None:
    """(index, stop string) of the first stop string in text[start:] (the longest one among
    those that begin at the same index), or None."""
    best = None
    for s in stops:
        i = text.find(s, start)
        if i >= 0 and (best is None or i < best[0] or (i == best[0] and len(s) > len(best[1]))):
            best = (i, s)
    return best


def cut_at_stop(text: str, stops: tuple[str, ...], include: bool) -> tuple[str, str | None]:
    """(the text up to its first stop string, with it when include; that string or None)."""
    found = find_stop(text, stops) if stops else None
    if found is None:
        return text, None
    i, s = found
    return text[: i + len(s) if include else i], s


class IncrementalText:
    """The decoded text of token ids added one at a time."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # the text of ids[:read], complete characters only
        self._prefix = 0  # ids[prefix:read] decode to the end of `text`
        self._read = 0
        self._held = 0  # characters of the text after ids[:read] already in `text`

    def copy(self) -> "IncrementalText":
        new = IncrementalText(self.tokenizer)
        new.ids, new.text, new._prefix, new._read, new._held = list(self.ids), self.text, self._prefix, self._read, self._held
        return new

    def add(self, token_id: int) -> str:
        """Add a token; the text it completes (possibly empty)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        after = decode(self.ids[self._prefix :], skip_special_tokens=True)
        pending = after[len(before) :] if after.startswith(before) else ""
        complete = pending.rstrip("\ufffd")  # a character cut short is held back until it ends
        new = complete[self._held :]
        self.text += new
        if complete == pending:
            self._read = len(self.ids)
            self._prefix = max(self._read - WINDOW, 0)
            self._held = 0
        else:
            self._held = len(complete)
        return new

    def rest(self) -> str:
        """The text the tokens added so far make, beyond `text` (a character cut short
        included, as a full decode has it); `text` then holds it all."""
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        new = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += new
        self._read, self._held = len(self.ids), 0
        self._prefix = max(self._read - WINDOW, 0)
        return new
