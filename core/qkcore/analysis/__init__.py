"""Analyses that run on a captured Q/K dataset.

An analysis is a ``qkcore`` command like any other: a plugin adds it through the
``qkcore_register_commands`` hook (see :mod:`qkcore.hookspecs`). The built-in one,
``qkcore plasticity`` (:mod:`.plasticity`), is declared in :mod:`qkcore.commands.data`.
"""
