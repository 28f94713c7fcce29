"""Windowed, blended, streamed inference (the engine behind ``predict`` and ``embed``)."""
