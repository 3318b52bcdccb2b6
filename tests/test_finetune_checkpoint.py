"""DeepSpeed checkpoints load with `weights_only` (real DeepSpeed, ZeRO-2, one gloo rank, no Ray)."""

from __future__ import annotations

import os
import pickle
import socket

import pytest
import torch

deepspeed = pytest.importorskip("deepspeed")


class Evil:
    """What a tampered checkpoint could carry: unpickling it would run code."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/prism-ray-pwned",))


@pytest.fixture
def process_group(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setenv("LOCAL_RANK", "0")  # what Ray Train sets in its workers

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _engine(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "train_batch_size": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True, "adam_w_mode": True}},
        "zero_optimization": {"stage": 2, "reduce_scatter": False, "overlap_comm": False},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config, dist_init_required=False
    )
    return engine


def test_zero2_checkpoint_round_trips_weights_only_and_refuses_pickled_code(process_group, tmp_path):
    from prism_ray.distributed.train_loop import full_fp32_state, use_weights_only_loading

    trained = _engine(0)
    use_weights_only_loading(trained)
    loss = trained(torch.ones(1, 4)).pow(2).mean()
    trained.backward(loss)
    trained.step()
    trained.save_checkpoint(str(tmp_path), tag="t")
    want = full_fp32_state(trained)

    fresh = _engine(1)
    use_weights_only_loading(fresh)
    fresh.load_checkpoint(str(tmp_path), tag="t")  # model states + ZeRO optimizer states, weights_only
    got = full_fp32_state(fresh)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert fresh.global_steps == 1

    model_states = tmp_path / "t" / "mp_rank_00_model_states.pt"
    torch.save({"module": Evil()}, model_states)
    with pytest.raises(pickle.UnpicklingError, match="weights_only|Unsupported global"):
        fresh.load_checkpoint(str(tmp_path), tag="t")
    assert not os.path.exists("/tmp/prism-ray-pwned")
