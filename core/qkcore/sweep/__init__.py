"""``qkcore sweep``: many runs (and ``--shards K`` runs over many machines) as Ray tasks.

=============  ==================================================================
module         job
=============  ==================================================================
``runs``       expand config paths and folders, load every config (no Ray)
``tasks``      what each Ray task does: a whole run, a shard, a shard run's prepare and finalize
``progress``   the board the tasks report to (a Ray actor) and the console lines it feeds
``summary``    the final table and the exit code
``driver``     starts or joins Ray, holds every run's data root, schedules the tasks
=============  ==================================================================

Ray is the extra ``qkcore[ray]``; only :mod:`.driver` and :mod:`.tasks` need it, and
nothing outside this package imports them.
"""
