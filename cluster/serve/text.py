"""Generated token ids to streamed text, honouring `stop` strings.

Each push decodes a short window of recent ids (the previous batch and the new one), not
all ids so far, so a long answer costs linear time; the window makes characters split
across tokens come out right. Only what is final is released: nothing after an
incomplete UTF-8 sequence, and nothing that could still turn out to be the start of a
stop string.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.frozen = ""  # text of ids[:read], final
        self.prefix = self.read = 0  # the window decoded each time is ids[prefix:]
        self.sent = 0  # characters of the text already released
        self.released = ""  # the text released so far
        self.stopped = False  # a stop string was found: the text ends before it

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _text(self) -> str:
        """All the text so far, decoding only ids[prefix:]."""
        head = self._decode(self.ids[self.prefix:self.read])
        tail = self._decode(self.ids[self.prefix:])
        if len(tail) > len(head) and not tail.endswith("\ufffd"):  # the new ids' text is whole
            self.frozen += tail[len(head):]
            self.prefix, self.read = self.read, len(self.ids)
            return self.frozen
        return self.frozen + tail[len(head):]

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
