"""The stages of a run, each a function (or a small class) an executor calls with typed inputs.

============  =================================================================  ==================
stage         what                                                               module
============  =================================================================  ==================
load          check the config, load the inputs, compute the identity; then,     ``load.py``
              separately, the weights
plan          the sampler, the layers and heads to capture, RoPE sites           ``plan.py``
capture       a unit of documents (a whole run, or a torchrun rank's share)      ``capture.py``
              into staged parts, progress committed with the rows
merge         rank 0 adopts every rank's staged parts (torchrun)                 ``merge.py``
finish        final files, card and manifest from the writer's statistics        ``finish.py``
publish       the finished files into the data root, under its record            ``publish.py``
push          the published files to the Hub branch, in one commit              ``push.py``
============  =================================================================  ==================

The run's state between them is :class:`qkcore.run_state.RunState`, committed in the
staging journal. Which stages run is the rule's decision (:mod:`qkcore.root_policy`)
carried out by an action (:mod:`qkcore.actions`).
"""
