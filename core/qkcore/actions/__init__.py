"""What ``qkcore sniff`` does once the rule (:mod:`qkcore.root_policy`) has decided: one module per action.

=====================  ====================================================================
module                 action
=====================  ====================================================================
``capture.py``         ``fresh`` / ``resume``: load the weights, capture (or resume), merge
                       the torchrun ranks, finish, publish, push
``pull.py``            ``pull``: the Hub branch holds this very run; download and publish it
``publish_staged.py``  ``publish``: this run finished but was not (fully) published
``complete.py``        ``complete``: nothing to do (but push a run that never was)
``context.py``         :class:`RunContext`, what every action is given
=====================  ====================================================================

Each action calls the stages (:mod:`qkcore.stages`) with their typed inputs.
"""
