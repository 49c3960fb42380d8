"""Evaluation: detectron2's mIoU family, GFLOPs (fvcore convention, attention counted), throughput, merge
statistics, and result files/tables."""
from .flop_count import FLOP_COUNT_BACKENDS, attention_macs, count_gflops, vit_encoder_macs
from .merge_stats import MergeStatsAccumulator
from .reporting import format_results_table, save_json, to_jsonable
from .sem_seg_evaluation import SemSegEvaluator
from .throughput import CallTimes, InferenceTimer, TimedCall, measure_throughput, time_calls, time_interleaved

__all__ = [
    "CallTimes",
    "FLOP_COUNT_BACKENDS",
    "InferenceTimer",
    "MergeStatsAccumulator",
    "SemSegEvaluator",
    "TimedCall",
    "attention_macs",
    "count_gflops",
    "format_results_table",
    "measure_throughput",
    "save_json",
    "time_calls",
    "time_interleaved",
    "to_jsonable",
    "vit_encoder_macs",
]
