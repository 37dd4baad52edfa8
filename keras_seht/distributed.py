r"""Data-parallel SEHT training across processes.

Under the torch backend, start one process per worker with ``torchrun``
and call `setup_from_environment` at the start of the script::

    torchrun --nproc_per_node 2 train.py

    # train.py
    import keras_seht
    import keras

    keras_seht.distributed.setup_from_environment()
    keras.utils.set_random_seed(0)       # the same seed on every worker
    model = keras_seht.Sequential([...])
    model.compile(..., seht=keras_seht.SEHTD(p=0.01))
    x, y = keras_seht.distributed.shard(x, y, drop_remainder=True)
    model.fit(x, y, batch_size=32)       # the global batch is 32 x workers

Each of the :math:`K` workers takes an equal share :math:`B_k` of the
global batch :math:`B = \cup_k B_k` and computes its exact local gradient
of :math:`L_k + \text{strength} \cdot t_k`; the step
(`keras_seht.step`) then averages the gradients, the penalty values and
the loss over the workers with one bucketed ``all_reduce`` before its
finiteness guard decides, so every worker applies the same update.

Why this is exact. Every worker seeds Keras alike
(``keras.utils.set_random_seed``), so its ``seht_seed_generator`` starts
from the same state and advances identically: every worker draws the
same probe :math:`\sigma` (and with `keras_seht.SEHTD` the same layers).
With equal shard sizes the global mean loss is the mean of the shard
losses, :math:`L = \frac1K \sum_k L_k`, and :math:`t = \sigma^\top
\nabla^2 L\, \sigma` is linear in :math:`L`, so

.. math::

    \frac1K \sum_k \nabla_w (L_k + \lambda t_k)
    = \nabla_w (L + \lambda t),

the single-process gradient on the global batch with that probe (equal to
float32 round-off). The same holds for every penalty linear in the loss
or in the per-sample outputs (the trace estimators, ``Jacobian``,
``ConfidencePenalty``); it does not for a nonlinear function of the
batch's gradient (``GradientNorm``, SAM and ASAM use each worker's own
gradient, like m-sharpness with :math:`m = B/K`), nor for
``clip_negative=True`` where the workers' :math:`t_k` differ in sign.

What is global and what is local:

- **Logs**: ``loss`` and the ``seht_*`` entries are the means over the
  workers, i.e. the global-batch values. The compiled metrics are made
  global by summing each step's change of their state variables
  (Keras metric states are sums over samples, declared with
  ``aggregation="sum"``: totals, counts, confusion counts), which is
  exact: the logged accuracy is the accuracy over the global batches.
- **BatchNorm**: the forward pass normalizes with each worker's local
  batch statistics, as ``torch.nn.parallel.DistributedDataParallel``
  does without ``SyncBatchNorm``; the step's update is then the mean of
  the workers' local-statistics gradients. The moving statistics (every
  non-trainable float variable) are averaged after each step: each
  worker's change is replaced by the mean change, so they stay identical
  on every worker; the moving mean then equals the single-process moving
  mean on the global batch, the moving variance is the mean of the local
  variances (lower by the spread of the shard means).
- **Validation and ``evaluate``** run on every worker locally; give every
  worker the same validation data and they log the same values.
- **Files**: only the chief (rank 0) writes: `keras_seht.experiments`'
  checkpoints and results, and every file written through
  ``keras_seht._io``.

A worker that dies or hangs makes the others fail at their next
collective with `WorkerError` (at once when its connection closes, or
after the `setup_from_environment` timeout), never a silent hang; a
rerun of every worker resumes from the last checkpoint
(`keras_seht.experiments.runner`, or ``keras.callbacks.BackupAndRestore``
with a directory only the chief writes to).

Dropout masks come from each layer's seed generator, which advances
alike on every worker: worker :math:`k` draws the mask a single process
would draw for a batch of :math:`B/K` samples, so a run with Dropout is
not the single-process run sample for sample.

A `keras_seht.Model` compiled with ``seht=None`` (a baseline) trains
with Keras' own step in a single process, and through the shared step
without penalties with several torch workers: it is averaged alike
(gradients, ``loss``, metrics, BatchNorm statistics). A plain
``keras.Model`` under torch is not averaged: wrap it
(`keras_seht.wrap`).

Synchronized BatchNorm: Keras computes synchronized batch statistics
(``BatchNormalization(synchronized=True)``) under TensorFlow only and
refuses the argument under torch; ``fit`` with several torch workers
also refuses a layer whose ``synchronized`` was set afterwards (it
would be local). Under torch, BatchNorm is local as described above.

Under TensorFlow and JAX, `setup_from_environment` starts the backend's
own mechanism (``TF_CONFIG``: a ``MultiWorkerMirroredStrategy``; a JAX
coordinator: ``jax.distributed`` with a ``keras.distribution.DataParallel``)
and the SEHT step runs inside it, globally. Under TensorFlow ``fit``
splits each global batch among the workers itself, so there `shard` and
`ShardedDataset` keep the data whole (every worker gives ``fit`` all of
it); under JAX each process feeds its share, as under torch.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from typing import Any, Callable, Sequence

import keras

from keras_seht._checks import check_bool, check_int, check_positive

#: Seconds a collective waits for the other workers before it fails.
DEFAULT_TIMEOUT = 300.0


class WorkerError(RuntimeError):
    """A collective with the other workers failed.

    Another worker died (its connection closed) or did not reach the same
    collective within the timeout of `setup_from_environment`.
    """


# ------------------------------------------------------------- who am I


def _torch_group() -> Any:
    """``torch.distributed`` when its default group is initialized."""
    if "torch" not in sys.modules:  # never import torch for nothing
        return None
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist
    return None


def _torch_rank_and_size() -> tuple[int, int]:
    dist = _torch_group()
    if dist is None:
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _jax_rank_and_size() -> tuple[int, int]:
    import jax

    if not jax.distributed.is_initialized():
        # Asking JAX for its processes would initialize its backends,
        # after which `jax.distributed.initialize` is refused.
        return 0, 1
    return jax.process_index(), jax.process_count()


def _tf_config_rank_and_size() -> tuple[int, int]:
    """The worker's place in ``TF_CONFIG`` (MultiWorkerMirroredStrategy).

    The ``chief`` task (if any) is rank 0, then the ``worker`` tasks by
    index; other task types (an ``evaluator``) are not training workers.
    """
    text = os.environ.get("TF_CONFIG")
    if not text:
        return 0, 1
    config = json.loads(text)
    cluster = config.get("cluster", {})
    chiefs = len(cluster.get("chief", []))
    workers = len(cluster.get("worker", []))
    task = config.get("task", {})
    kind, index = task.get("type"), int(task.get("index", 0))
    size = max(chiefs + workers, 1)
    if kind == "chief":
        return index, size
    if kind == "worker":
        return chiefs + index, size
    return 0, size


#: Each backend's ``() -> (rank, world size)``.
_RANK_AND_SIZE: dict[str, Callable[[], tuple[int, int]]] = {
    "torch": _torch_rank_and_size,
    "jax": _jax_rank_and_size,
    "tensorflow": _tf_config_rank_and_size,
}


def _rank_and_size() -> tuple[int, int]:
    find = _RANK_AND_SIZE.get(keras.config.backend())
    return (0, 1) if find is None else find()


def rank() -> int:
    """This worker's index in 0..world_size() - 1 (0 in a single process).

    Under torch, the rank in the initialized ``torch.distributed`` group;
    under JAX, ``jax.process_index()`` once ``jax.distributed`` is
    initialized; under TensorFlow, the task's place in ``TF_CONFIG`` (the
    chief first, then the workers).

    Example:
    >>> import keras_seht
    >>> keras_seht.distributed.rank()
    0
    """
    return _rank_and_size()[0]


def world_size() -> int:
    """The number of data-parallel workers (1 in a single process).

    Example:
    >>> import keras_seht
    >>> keras_seht.distributed.world_size()
    1
    """
    return _rank_and_size()[1]


def is_chief() -> bool:
    """Whether this worker writes the files (rank 0; True when alone).

    Example:
    >>> import keras_seht
    >>> keras_seht.distributed.is_chief()
    True
    """
    return rank() == 0


# ----------------------------------------------------------------- setup


def _environment_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise ValueError(
                f"The environment variable {name} is not set; start the "
                "workers with torchrun (or set RANK, WORLD_SIZE, "
                "MASTER_ADDR and MASTER_PORT yourself)."
            )
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"The environment variable {name} must be an integer. "
            f"Received: {name}={value!r}"
        ) from None


def _setup_torch(timeout: float) -> int:
    """``torch.distributed.init_process_group`` from torchrun's variables."""
    size = _environment_int("WORLD_SIZE", 1)
    if size < 1:
        raise ValueError(
            f"WORLD_SIZE must be an integer >= 1. Received: WORLD_SIZE={size}"
        )
    if size == 1:
        return 1
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != size:
            raise ValueError(
                "torch.distributed is initialized with "
                f"{dist.get_world_size()} workers, but WORLD_SIZE={size}."
            )
        return size
    worker = _environment_int("RANK")
    if not 0 <= worker < size:
        raise ValueError(
            f"RANK must be in 0..{size - 1} (WORLD_SIZE={size}). "
            f"Received: RANK={worker}"
        )
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ValueError(
                f"The environment variable {name} is not set; start the "
                "workers with torchrun, which sets it."
            )
    if torch.cuda.is_available():
        # Before any tensor: Keras' "cuda" device is then this GPU.
        torch.cuda.set_device(_environment_int("LOCAL_RANK", 0))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=worker,
        world_size=size,
        timeout=datetime.timedelta(seconds=timeout),
    )
    return size


def _setup_tensorflow(timeout: float) -> int:
    """A ``MultiWorkerMirroredStrategy`` from ``TF_CONFIG``, made default.

    `keras_seht.backend.tensorflow.strategy_from_environment` creates and
    installs it (``tf.distribute.experimental_set_strategy``); the number
    of workers is the number of ``chief`` and ``worker`` tasks in
    ``TF_CONFIG`` (1 without it, and nothing is done).
    """
    from keras_seht.backend import tensorflow as tf_backend

    if tf_backend.strategy_from_environment(timeout) is None:
        return 1
    return _tf_config_rank_and_size()[1]


def _setup_jax(timeout: float) -> int:
    """``jax.distributed.initialize`` from the environment, DataParallel.

    `keras_seht.backend.jax.initialize_from_environment` reads the
    coordinator, the process count and this process's id
    (``KERAS_DISTRIBUTION_*`` or ``JAX_*``), initializes JAX and sets a
    ``keras.distribution.DataParallel`` over every process's devices. JAX
    applies its own timeouts (`timeout` is not used). Without a
    coordinator, nothing is done.
    """
    import jax

    from keras_seht.backend import jax as jax_backend

    if jax_backend.initialize_from_environment() is None:
        return 1
    return int(jax.process_count())


#: Each backend's ``setup(timeout) -> world size`` from the environment.
#: The backend modules are imported only when their setup runs (never
#: TensorFlow under another backend).
_SETUPS: dict[str, Callable[[float], int]] = {
    "torch": _setup_torch,
    "tensorflow": _setup_tensorflow,
    "jax": _setup_jax,
}


def setup_from_environment(timeout: float = DEFAULT_TIMEOUT) -> int:
    r"""Joins the data-parallel workers the environment describes.

    Under torch, reads torchrun's ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` and initializes
    ``torch.distributed`` (``gloo`` on CPU; ``nccl`` on CUDA, with this
    process on GPU ``LOCAL_RANK``). A no-op in a single process
    (``WORLD_SIZE`` unset or 1) and when already initialized.

    Under TensorFlow, with ``TF_CONFIG`` set, creates a
    ``tf.distribute.MultiWorkerMirroredStrategy`` and installs it as the
    default strategy
    (`keras_seht.backend.tensorflow.strategy_from_environment`): models
    built afterwards live in it, and ``fit`` splits each global batch
    among the workers itself (so `shard` and `ShardedDataset` leave the
    data whole there: give every worker the whole data set). The number
    of workers is that of the ``chief`` and ``worker`` tasks.

    Under JAX, with a coordinator set (``KERAS_DISTRIBUTION_JOB_ADDRESSES``
    or ``JAX_COORDINATOR_ADDRESS``, with the process count and id),
    initializes ``jax.distributed`` and sets a
    ``keras.distribution.DataParallel`` over every process's devices
    (`keras_seht.backend.jax.initialize_from_environment`); each process
    then feeds its own share of every global batch (`shard`,
    `ShardedDataset`). The number of workers is the process count.

    Without those variables, a no-op on every backend. Call it first,
    before building a model (before any TensorFlow or JAX computation);
    then seed every worker alike (``keras.utils.set_random_seed``): the
    initial weights and the SEHT probes are then the same on every
    worker.

    Args:
        timeout: Seconds a collective waits for the other workers before
            it fails (> 0): under torch it raises `WorkerError`; a worker
            that dies closes its connections, which the others notice at
            once, and the timeout bounds the wait for a worker that
            hangs. Under TensorFlow, the strategy's collective timeout.
            Not used under JAX (JAX's own timeouts apply).

    Returns:
        The number of workers (1 in a single process).

    Raises:
        ValueError: `timeout` is not > 0, or the environment is
            incomplete or inconsistent (e.g. ``WORLD_SIZE=2`` without
            ``RANK``, or a JAX coordinator without the process count).

    Example:
    >>> import keras_seht
    >>> keras_seht.distributed.setup_from_environment()  # no torchrun
    1
    """
    timeout = check_positive("timeout", timeout)
    setup = _SETUPS.get(keras.config.backend())
    if setup is None:
        return world_size()
    return setup(timeout)


# ------------------------------------------------------------ collectives


def all_reduce_sum(tensors: Sequence[Any]) -> list[Any]:
    """The sum over the workers of each torch tensor, bucketed.

    The tensors are flattened into one buffer per dtype and device and
    reduced with one ``torch.distributed.all_reduce`` each (one call for
    a step's float32 gradients, however many variables). Without an
    initialized group (or with one worker), `tensors` as they are.

    Args:
        tensors: Torch tensors (any shapes; the same on every worker).

    Returns:
        The reduced tensors, in the order given.

    Raises:
        WorkerError: The collective failed (a worker died or hung).
    """
    tensors = list(tensors)
    dist = _torch_group()
    if dist is None or dist.get_world_size() == 1 or not tensors:
        return tensors
    return _torch_all_reduce_sum(dist, tensors)


def _torch_all_reduce_sum(dist: Any, tensors: list[Any]) -> list[Any]:
    """`all_reduce_sum` over the initialized group `dist`."""
    import torch

    buckets: dict[tuple[Any, Any], list[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.dtype, t.device), []).append(i)
    out: list[Any] = [None] * len(tensors)
    for indices in buckets.values():
        parts = [tensors[i].detach().reshape(-1) for i in indices]
        flat = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
        try:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        except RuntimeError as error:  # DistBackendError included
            raise WorkerError(
                f"Worker {dist.get_rank()} of {dist.get_world_size()}: an "
                "all-reduce with the other workers failed: a worker died "
                "or did not reach the same step within the timeout. Start "
                "every worker again to resume from the last checkpoint. "
                f"Cause: {error}"
            ) from error
        offset = 0
        for i in indices:
            size = tensors[i].numel()
            out[i] = flat[offset : offset + size].view(tensors[i].shape)
            offset += size
    return out


def all_reduce_mean(tensors: Sequence[Any]) -> list[Any]:
    """The mean over the workers of each torch tensor (`all_reduce_sum` / K).

    Integer and boolean tensors are refused: their mean is not one.

    Raises:
        ValueError: A tensor is not floating-point.
        WorkerError: The collective failed (a worker died or hung).
    """
    tensors = list(tensors)
    for t in tensors:
        if not t.is_floating_point():
            raise ValueError(
                "`tensors` must be floating-point to be averaged. "
                f"Received: dtype={t.dtype}"
            )
    dist = _torch_group()
    if dist is None or dist.get_world_size() == 1 or not tensors:
        return tensors
    count = dist.get_world_size()
    return [t / count for t in _torch_all_reduce_sum(dist, tensors)]


# -------------------------------------------------------------- the data


def _rows(name: str, leaves: Sequence[Any]) -> int:
    """The common number of rows of `leaves` (ValueError if they differ)."""
    counts = {int(keras.ops.shape(a)[0]) for a in leaves}
    if len(counts) != 1:
        raise ValueError(
            f"Every array of `{name}` must have as many rows. Received "
            f"rows: {sorted(counts)}"
        )
    return counts.pop()


def _worker(rank_: int | None, size: int | None) -> tuple[int, int]:
    """(rank, world size): given, or this process'.

    Under TensorFlow, where neither is given, ``(0, 1)``: the strategy
    splits each global batch among the workers itself (tf.data's
    auto-sharding), so the data set is not to be split before.
    """
    if rank_ is None and size is None and _splits_batches_itself():
        return 0, 1
    found = _rank_and_size()
    size = found[1] if size is None else check_int("world_size", size)
    rank_ = found[0] if rank_ is None else check_int("rank", rank_, 0)
    if rank_ >= size:
        raise ValueError(
            f"`rank` must be in 0..{size - 1} (world_size={size}). "
            f"Received: rank={rank_}"
        )
    return rank_, size


def _splits_batches_itself() -> bool:
    """Whether the backend's distribution splits each global batch itself.

    TensorFlow's strategies do (``fit`` distributes the data set and
    auto-shards it among the workers); under torch and JAX each worker
    feeds its own share.
    """
    return keras.config.backend() == "tensorflow"


def _slice_rows(structure: Any, start: int, stop: int) -> Any:
    return keras.tree.map_structure(
        lambda a: None if a is None else a[start:stop], structure
    )


def shard(
    x: Any,
    y: Any = None,
    sample_weight: Any = None,
    *,
    drop_remainder: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
) -> Any:
    r"""This worker's contiguous, equal-size part of a data set of arrays.

    With :math:`N` samples and :math:`K` workers, worker :math:`r` gets
    rows :math:`[r n, (r + 1) n)`, :math:`n = \lfloor N / K \rfloor`.
    Equal parts matter: every worker must run the same number of steps,
    and the global mean loss is the mean of the workers' only for equal
    batches. ``fit(x, y, batch_size=b)`` on the parts then trains on
    global batches of :math:`K b` samples. Shuffle the data before
    sharding if its order is not random (``fit(shuffle=True)`` shuffles
    within each part, alike on every worker).

    Args:
        x: Inputs: an array, or a structure (dict, list) of arrays with
            the same number of rows.
        y: Targets, or None.
        sample_weight: Sample weights, or None.
        drop_remainder: With :math:`N` not a multiple of :math:`K`, drop
            the last :math:`N \bmod K` samples (True) or raise (False).
        rank: The worker (default: `keras_seht.distributed.rank()`).
        world_size: The number of workers (default:
            `keras_seht.distributed.world_size()`).

    Under TensorFlow, where neither `rank` nor `world_size` is given, the
    data are returned whole: ``fit`` under the strategy of
    `setup_from_environment` splits each global batch among the workers
    itself, and every worker must give it the whole data set. (Given
    explicitly, `rank` and `world_size` split the arrays as asked, on
    every backend.)

    Returns:
        The part of `x`; ``(x, y)`` where `y` is given; ``(x, y,
        sample_weight)`` where `sample_weight` is given (as
        ``keras.utils.unpack_x_y_sample_weight`` reads them).

    Raises:
        ValueError: The arrays' numbers of rows differ, :math:`N` is not a
            multiple of :math:`K` without `drop_remainder`, or there are
            fewer samples than workers.

    Example:
    >>> import numpy as np
    >>> from keras_seht.distributed import shard
    >>> x, y = np.arange(10.0), np.arange(10)
    >>> shard(x, y, rank=1, world_size=2)[1].tolist()
    [5, 6, 7, 8, 9]
    """
    drop_remainder = check_bool("drop_remainder", drop_remainder)
    worker, size = _worker(rank, world_size)
    leaves = [
        a for a in keras.tree.flatten((x, y, sample_weight)) if a is not None
    ]
    total = _rows("x, y and sample_weight", leaves)
    part, extra = divmod(total, size)
    if part == 0:
        raise ValueError(
            f"{total} samples cannot be shared among {size} workers "
            "(fewer samples than workers)."
        )
    if extra and not drop_remainder:
        raise ValueError(
            f"{total} samples do not divide among {size} workers: pass "
            f"`drop_remainder=True` to drop the last {extra}, or give a "
            f"multiple of {size}."
        )
    start = worker * part
    x, y, sample_weight = _slice_rows(
        (x, y, sample_weight), start, start + part
    )
    if y is None and sample_weight is None:
        return x
    if sample_weight is None:
        return x, y
    return x, y, sample_weight


class ShardedDataset(keras.utils.PyDataset):
    r"""Splits each batch of a `keras.utils.PyDataset` among the workers.

    Batch :math:`i` of this data set is worker :math:`r`'s contiguous
    share of batch :math:`i` of `dataset`: with :math:`n` samples in it
    and :math:`K` workers, rows :math:`[r m, (r + 1) m)`,
    :math:`m = \lfloor n / K \rfloor`. Every worker thus steps through
    the same batches, and the global batch of a data-parallel step is
    exactly `dataset`'s batch: a :math:`K`-worker run takes the steps of a
    single-process run on `dataset` (same number of steps per epoch, same
    global batches, same probes; equal to float32 round-off for a model
    without BatchNorm or Dropout). Each worker reads the whole batch and
    keeps its share (the loading and augmentation are repeated on every
    worker). With ``fit(shuffle=True)`` Keras shuffles the batch order
    with Python's ``random`` module, alike on every worker seeded alike.

    Args:
        dataset: The data set whose batches to split; its batches are
            ``x``, ``(x,)``, ``(x, y)`` or ``(x, y, sample_weight)``
            (nested structures of arrays).
        drop_remainder: For a batch whose size :math:`n` is not a multiple
            of :math:`K`, drop its last :math:`n \bmod K` samples (True)
            or raise ValueError when it is read (False).
        rank: The worker (default: `keras_seht.distributed.rank()` when
            the data set is made).
        world_size: The number of workers (default:
            `keras_seht.distributed.world_size()`). Under TensorFlow,
            where neither `rank` nor `world_size` is given, every batch
            is kept whole (as by `shard`: the strategy splits it).
        **kwargs: Passed to `keras.utils.PyDataset` (``workers``,
            ``use_multiprocessing``, ``max_queue_size``); by default
            `dataset`'s.

    Other public attributes (``set_epoch`` of
    `keras_seht.data.pipeline.ArrayDataset`, ...) are `dataset`'s.

    Example:
    >>> import numpy as np
    >>> from keras_seht.data.pipeline import ArrayDataset
    >>> from keras_seht.distributed import ShardedDataset
    >>> ds = ArrayDataset(np.arange(8.0), np.arange(8), 4, shuffle=False)
    >>> part = ShardedDataset(ds, rank=1, world_size=2)
    >>> len(part), part[0][1].tolist()
    (2, [2, 3])
    """

    def __init__(
        self,
        dataset: keras.utils.PyDataset,
        drop_remainder: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(dataset, keras.utils.PyDataset):
            raise ValueError(
                "`dataset` must be a keras.utils.PyDataset. Received: "
                f"dataset of type {type(dataset).__name__}"
            )
        for name in ("workers", "use_multiprocessing", "max_queue_size"):
            kwargs.setdefault(name, getattr(dataset, name))
        super().__init__(**kwargs)
        self.dataset = dataset
        self.drop_remainder = check_bool("drop_remainder", drop_remainder)
        self.rank, self.world_size = _worker(rank, world_size)

    def __getattr__(self, name: str) -> Any:
        # Only called for names not found on the object itself.
        if name.startswith("_") or name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    @property
    def num_batches(self) -> int | None:
        """`dataset`'s number of batches (None where it is infinite)."""
        return self.dataset.num_batches

    def __len__(self) -> int:
        count = self.num_batches
        if count is None:
            raise TypeError("The wrapped data set is infinite.")
        return int(count)

    def __getitem__(self, index: int) -> Any:
        batch = self.dataset[index]
        leaves = [a for a in keras.tree.flatten(batch) if a is not None]
        total = _rows(f"batch {index}", leaves)
        part, extra = divmod(total, self.world_size)
        if part == 0 or (extra and not self.drop_remainder):
            raise ValueError(
                f"Batch {index} holds {total} samples, which do not divide "
                f"among {self.world_size} workers. Use a batch size that "
                "is a multiple of the number of workers (and drop an "
                "incomplete last batch), or `drop_remainder=True` to drop "
                f"the last {extra} samples of such a batch."
                if part
                else f"Batch {index} holds {total} samples, fewer than the "
                f"{self.world_size} workers."
            )
        start = self.rank * part
        return _slice_rows(batch, start, start + part)

    def on_epoch_begin(self) -> None:
        """Calls `dataset`'s ``on_epoch_begin``."""
        self.dataset.on_epoch_begin()

    def on_epoch_end(self) -> None:
        """Calls `dataset`'s ``on_epoch_end``."""
        self.dataset.on_epoch_end()
