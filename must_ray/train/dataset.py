"""The driver side of training input: examples tables -> one Ray Dataset.

Read any number of examples tables with ``ray.data.read_parquet``, conform each to the run's task
list (:func:`must_ray.table.conform`: a task a table lacks reads as all-null, i.e. masked) and
union them. Files are shuffled per epoch (``FileShuffleConfig(reseed_after_execution=True)``);
rows are mixed further by each worker's local shuffle buffer. Every shuffle is seeded and the
datasets keep their order (``execution_options.preserve_order``), so one seed gives one data order
however the read tasks are scheduled (docs/training.md, Reproducibility). Reading stays light (Parquet +
column ops only), so the read tasks reserve a fraction of a CPU (``TrainConfig.read_cpus``) and
never starve while the training workers hold the rest. The worker side is
:mod:`must_ray.train.collate`.
"""
from __future__ import annotations

import math
from typing import Sequence

from must_ray.table import BASE_COLUMNS, Conform, table_schema
from must_ray.tasks import get_task_class


def read_tables(paths: Sequence[str], tasks: Sequence[str], *, seed: int = 0, read_cpus: float = 0.25,
                shuffle_files: bool = True):
    """One Ray Dataset over every table in ``paths``, conformed to ``tasks`` and unioned.

    Only the base columns and the tasks' columns a table has are read; conform adds the rest as
    nulls. ``read_cpus``: logical CPUs each read task reserves (fractional, so reading is never
    starved by training workers that hold whole CPUs)."""
    import ray.data
    from ray.data import FileShuffleConfig

    if not paths:
        raise ValueError("no training tables given")
    wanted = set(BASE_COLUMNS)
    for t in tasks:
        wanted.update(f.name for f in get_task_class(t).columns())
    parts = []
    for i, path in enumerate(paths):
        names = table_schema(path).names
        missing = [c for c in BASE_COLUMNS if c not in names]
        if missing:
            raise ValueError(f"{path} is not an examples table: it lacks base columns {missing}")
        columns = [c for c in names if c in wanted]
        shuffle = FileShuffleConfig(seed=seed + i, reseed_after_execution=True) if shuffle_files else None
        ds = ray.data.read_parquet(path, shuffle=shuffle, num_cpus=read_cpus)
        ds.context.execution_options.preserve_order = True  # blocks in file order, whichever read ends first
        ds = ds.select_columns(columns)
        ds = ds.map_batches(Conform(tasks=list(tasks)), batch_format="pyarrow", batch_size=None, num_cpus=read_cpus)
        parts.append(ds)
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def cache_in_object_store(ds, num_rows: int, block_rows: int, seed: int = 0):
    """Materialise ``ds`` in the object store, split into blocks of about ``block_rows`` rows, with
    the block order re-randomised at every execution (= every epoch). Each epoch then starts
    from memory instead of re-reading Parquet (which costs seconds of task start-up per epoch on
    small tables), and the block shuffle + each worker's local shuffle buffer mix the rows."""
    from ray.data import RandomSeedConfig

    blocks = max(1, math.ceil(num_rows / max(1, block_rows)))
    cached = ds.materialize()
    if cached.num_blocks() < blocks:  # splitting blocks already in memory is cheap; before, it is a stage
        cached = cached.repartition(blocks).materialize()
    return cached.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
