"""A user's own partitioner, as ``partitioner=tests/every_kth_partitioner.py:EveryKth``."""

from flwr_datasets.partitioner import Partitioner


class EveryKth(Partitioner):
    """Node i: rows i, i + n, i + 2n, ... (n = ``num_partitions``)."""

    def __init__(self, num_partitions: int, seed: int = 0) -> None:
        super().__init__()
        self._n = num_partitions

    @property
    def num_partitions(self) -> int:
        """How many nodes the rows are split between."""
        return self._n

    def load_partition(self, partition_id: int):
        """Every n-th row, from row ``partition_id``."""
        return self.dataset.select(range(partition_id, len(self.dataset), self._n))
