"""A Ray Train worker that dies mid-run: the group restarts from the latest checkpoint."""

from __future__ import annotations

import pytest
import ray
import torch

from raymix.config import load_config
from raymix.integrations import ray_train
from tests.faults.helpers import TINY


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2)
    yield
    ray.shutdown()


def test_a_dead_worker_is_replaced_and_training_finishes(local_ray, tmp_path, fault):
    cfg = load_config(None, [
        *TINY, f"training.output_dir={tmp_path / 'run'}", "scaling.num_workers=2",
        "scaling.cpus_per_worker=0.5", "training.epochs=3", "scaling.max_failures=1", "debug.fail_at_epoch=2",
    ])  # fmt: skip
    result = ray_train.run(cfg, log=lambda _: None)
    run_dir = tmp_path / "run"
    died = (run_dir / ".failed_at_epoch_2").exists()
    state = torch.load(run_dir / "checkpoint_epoch_0003" / "state.pt", weights_only=True)
    # 1,347 training digits in global batches of 64: 21 steps an epoch on each worker.
    steps = 3 * (1347 // 64)
    ok = died and result["epoch"] == 3 and state["epoch"] == 3 and state["step"] == steps
    fault("a Ray Train worker killed (os._exit) at the start of epoch 2 of 3, `max_failures=1`",
          "restarts from the epoch-1 checkpoint; ends at epoch 3 with each step taken once",
          f"worker died: {died}; ended at epoch {state['epoch']} after {state['step']} steps "
          f"({steps} = 3 epochs)", ok)  # fmt: skip
