"""Loaded models shared by the decoders of one process.

`specray bench` builds one decoder per method (the target alone, with a draft, with each
kind of heads); they all decode with the same weights, loaded once here. Each decoder
keeps its own runner and KV cache: only the weights are shared, and only one decoder of
a pool computes at a time (the bench runs methods one after another).
"""

from __future__ import annotations

from typing import Callable

from actors import loading


class ModelPool:
    def __init__(self) -> None:
        self._loaded: dict[tuple[str, str], loading.LoadedModel] = {}
        self._measured: dict[tuple, object] = {}

    def load(self, name: str, dtype: str, progress: bool = False) -> loading.LoadedModel:
        key = (name, dtype)
        if key not in self._loaded:
            self._loaded[key] = loading.load(name, dtype, progress=progress)
        return self._loaded[key]

    def measured(self, key: tuple, measure: Callable[[], object]) -> object:
        """A measurement of a loaded model (the target's verify costs), taken once."""
        if key not in self._measured:
            self._measured[key] = measure()
        return self._measured[key]

    @property
    def loaded(self) -> list[tuple[str, str]]:
        """(name, dtype) of every model loaded so far."""
        return list(self._loaded)
