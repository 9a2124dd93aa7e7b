"""Generated token ids to streamed text, honouring `stop` strings.

Text is re-decoded from all ids so far (multi-byte characters and merges across tokens
come out right) and only what is final is released: nothing after an incomplete UTF-8
sequence, and nothing that could still turn out to be the start of a stop string.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already released
        self.released = ""  # the text released so far
        self.stopped = False  # a stop string was found: the text ends before it

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, ids: list[int]) -> str:
        """Add tokens; return the newly final text (maybe empty). Sets `stopped`."""
        if self.stopped:
            return ""
        self.ids.extend(ids)
        text = self._text()
        cut = min((i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.stopped = True
            return self._release(text[:cut])
        end = len(text)
        while end > self.sent and text[end - 1] == "\ufffd":  # an unfinished character
            end -= 1
        for stop in self.stops:  # hold back a tail that may grow into a stop string
            for k in range(min(len(stop) - 1, end - self.sent), 0, -1):
                if text[end - k:end] == stop[:k]:
                    end -= k
                    break
        return self._release(text[:end])

    def finish(self) -> str:
        """The rest, once generation ended without a stop string."""
        return "" if self.stopped else self._release(self._text())

    def _release(self, text: str) -> str:
        delta = text[self.sent:]
        self.sent = max(self.sent, len(text))
        self.released += delta
        return delta
