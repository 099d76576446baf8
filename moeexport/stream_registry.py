"""Which torch models are streamed, and by which moeexport.streaming.LayerStream.

A weak mapping, not an attribute on the model: the stream is found only through
`stream_of` (which moeexport.streaming offers), and it goes when its model goes.
This module imports nothing of the package, so the surgery in moeexport.adapters
can tell a stream what it removed without importing streaming (which imports the
adapters).
"""

from __future__ import annotations

import weakref

_STREAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its LayerStream


def attach(model, stream) -> None:
    """`model` is read layer by layer by `stream` from now on (the stream must hold the model only weakly)."""
    _STREAMS[model] = stream


def detach(model) -> None:
    """`model` is an ordinary model again (its weights are in memory)."""
    _STREAMS.pop(model, None)


def stream_of(model):
    """The LayerStream that reads `model`, or None for a model held in memory."""
    return _STREAMS.get(model)
