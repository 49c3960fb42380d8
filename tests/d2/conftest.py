"""Isolation for the detectron2 tests: one intra-op thread for their tiny models, and the loggers detectron2's
``setup_logger`` reconfigures (handlers, no propagation) restored after each test, so later tests' caplog sees
algm_d2's records."""
import logging

import pytest
import torch

LOGGERS = ("algm_d2", "detectron2", "d2", "fvcore", "mask2former")


@pytest.fixture(autouse=True)
def one_torch_thread():
    # the ops are too small to split, and on shared CPU cores the thread hand-offs took longer than the ops
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def restore_loggers():
    saved = {name: (logger.level, logger.propagate, list(logger.handlers))
             for name, logger in ((n, logging.getLogger(n)) for n in LOGGERS)}
    yield
    for name, (level, propagate, handlers) in saved.items():
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if handler not in handlers:
                handler.close()
        logger.setLevel(level)
        logger.propagate = propagate
        logger.handlers[:] = handlers
