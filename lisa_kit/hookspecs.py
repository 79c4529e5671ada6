"""pluggy hook specifications: the one contract a plugin module implements.

A plugin is a module (or object) named in the ``lisa_kit`` entry-point group of its
distribution that implements ``lisa_kit_components`` with ``@lisa_kit.hookimpl``.
"""
from __future__ import annotations

import pluggy

PROJECT = "lisa_kit"
ENTRY_POINT_GROUP = "lisa_kit"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def lisa_kit_components():
    """Return a list of :class:`lisa_kit.interfaces.ComponentSpec` this plugin provides."""
