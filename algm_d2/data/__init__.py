"""Data: dataset registry (builtins registered on import), readers, the mapper, samplers and loader builders."""
from .build import (InferenceBatches, SerializedRecords, SkipCounter, TrainBatches, build_test_loader,
                    build_train_loader, seed_worker, trivial_batch_collator)
from .builtin import register_all_builtin
from .catalog import (DATASET_REGISTRY, DatasetMetadata, RegisteredDataset, dataset_root, get_dataset_dicts,
                      get_metadata, register_dataset)
from .demo import DemoShapes, render_demo_shapes
from .folders import SemSegFolders, register_custom_sem_seg, register_datasets_from_config
from .mapper import SemSegDatasetMapper
from .readers import BadSampleError, read_image, read_sem_seg
from .samplers import InferenceSampler, TrainingSampler

register_all_builtin()

__all__ = [
    "DATASET_REGISTRY", "DatasetMetadata", "RegisteredDataset", "register_dataset", "get_dataset_dicts",
    "get_metadata", "dataset_root", "SemSegFolders", "register_custom_sem_seg", "register_datasets_from_config",
    "DemoShapes", "render_demo_shapes", "read_image", "read_sem_seg", "BadSampleError", "SemSegDatasetMapper",
    "TrainingSampler", "InferenceSampler", "TrainBatches", "InferenceBatches", "SerializedRecords", "SkipCounter",
    "build_train_loader", "build_test_loader", "trivial_batch_collator", "seed_worker",
]
