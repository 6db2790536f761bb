"""The jobs behind :class:`qkcore.writer.DatasetWriter`, one module each.

========================  ==================================================================
module                    job
========================  ==================================================================
:mod:`.rows`              one config's rows as numpy columns, their sort key, sorting, gather
:mod:`.parts`             spill part files (Arrow IPC) and the key index in their schema;
                          reading a key range back
:mod:`.journal`           ``journal.json``: what a commit records, resume checks, conflicts
:mod:`.merge`             the bounded external merge: key ranges of at most a budget of rows,
                          gathered from the parts and sorted
========================  ==================================================================

The final Parquet file (options, row groups, statistics, reading it back) is
:mod:`qkcore.datafile`.
"""
