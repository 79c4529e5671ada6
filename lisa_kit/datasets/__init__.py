"""Dataset readers for LISA's training and evaluation sources in their real layouts.

``open_dataset(name, root, split)`` returns a reader; ``dataset_names()`` lists them.
"""
from lisa_kit.datasets.base import (CheckReport, DatasetReader, IGNORE_LABEL, Record, Target, dataset_names,
                                    open_dataset, register_dataset)

__all__ = ["CheckReport", "DatasetReader", "IGNORE_LABEL", "Record", "Target", "dataset_names", "open_dataset",
           "register_dataset"]
