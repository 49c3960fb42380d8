"""The start of a distributed run cannot hang silently: rank 0 names the ranks that have not joined (every 30 s,
then in its error after DEEPSPEED.START_TIMEOUT), and a rank without rank 0 says so."""
from __future__ import annotations

import importlib
import logging
import os
from datetime import timedelta
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from algm_d2.config import get_cfg
from algm_d2.engine import launch, launch_options
from algm_d2.engine.launch import find_free_port, init_distributed

# the module (the package's ``launch`` is the function)
launch_module = importlib.import_module("algm_d2.engine.launch")


def _never_called():
    raise AssertionError("the main function must not run without the whole group")


def test_rank_0_names_the_ranks_that_never_joined(monkeypatch, caplog):
    monkeypatch.setattr(launch_module, "WAITING_LOG_PERIOD", 0.5)
    url = f"tcp://127.0.0.1:{find_free_port()}"
    with mock.patch.dict(os.environ), caplog.at_level(logging.WARNING):
        with pytest.raises(TimeoutError, match=r"ranks \[1, 2\] of 3 did not join rank 0 .* within 2 s "
                                               r"\(DEEPSPEED.START_TIMEOUT\)"):
            launch(_never_called, 1, num_machines=3, machine_rank=0, dist_url=url, backend="gloo",
                   start_timeout=2)
    assert "waiting for ranks [1, 2] of 3 to join" in caplog.text
    assert not dist.is_initialized()


def test_a_rank_without_rank_0_stops_naming_it():
    url = f"tcp://127.0.0.1:{find_free_port()}"
    with mock.patch.dict(os.environ):
        with pytest.raises(TimeoutError, match=r"rank 1: rank 0 at 127.0.0.1:\d+ could not be reached within 1 s"):
            launch(_never_called, 1, num_machines=2, machine_rank=1, dist_url=url, backend="gloo", start_timeout=1)


def test_timeouts_come_from_the_config():
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    assert launch_options(cfg) == {"backend": "gloo", "start_timeout": 600, "collective_timeout": 1800}
    cfg.DEEPSPEED.START_TIMEOUT = 0
    with pytest.raises(ValueError, match="DEEPSPEED.START_TIMEOUT must be > 0"):
        launch_options(cfg)


def test_the_group_gets_the_collective_timeout():
    with mock.patch.dict(os.environ):
        init_distributed({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                          "MASTER_PORT": str(find_free_port())}, "gloo", start_timeout=5, collective_timeout=77)
        try:
            backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
            assert backend.options._timeout == timedelta(seconds=77)
        finally:
            dist.destroy_process_group()
