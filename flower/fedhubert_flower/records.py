"""numpy dicts <-> Flower ArrayRecords, keeping fedhubert's parameter names and order."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


def record_from_arrays(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(a) for name, a in arrays.items()})


def arrays_from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: a.numpy() for name, a in record.items()}
