"""Real DeepSpeed, one gloo rank, no Ray: checkpoints load with `weights_only` (ZeRO-2), and the optimizer
our DeepSpeed config asks for is the one DeepSpeed builds."""

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


@pytest.fixture(scope="module")
def process_group():
    """One gloo group for the module, as a worker has one for its life (DeepSpeed caches its groups)."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOCAL_RANK", "0")  # what Ray Train sets in its workers
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


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gpu_config_builds_torch_fused_adamw(process_group, precision):
    """A GPU job's config asks for torch's fused AdamW; DeepSpeed must pass `fused` through to it (checked on
    CPU, where torch has the fused kernel too): one step equals torch's own AdamW, and bf16 keeps fp32 masters."""
    from prism_ray.config import build_config
    from prism_ray.pipelines.deepspeed_config import build_deepspeed_config
    from prism_ray.pipelines.finetune import FinetuneConfig

    base = {"data": {"manifest": "m.parquet"}, "run": {"storage_path": "/tmp/runs", "name": "t"}}
    overrides = ["compute.use_gpu=true", f"train.precision={precision}", "train.learning_rate=1e-2"]
    ds = build_deepspeed_config(build_config(FinetuneConfig, base, overrides))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    reference = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    reference.load_state_dict(model.state_dict())
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds, dist_init_required=False
    )
    optimizer = engine.basic_optimizer
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"] is True
    assert all(p.dtype == torch.float32 for group in optimizer.param_groups for p in group["params"])
    x = torch.ones(1, 4)
    engine.backward(engine(x.to(next(engine.module.parameters()).dtype)).float().pow(2).mean())
    engine.step()
    plain = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=1e-2)
    reference(x).pow(2).mean().backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    plain.step()
    tolerance = 1e-6 if precision == "fp32" else 1e-2  # bf16: the module's weights are rounded copies
    for p, q in zip(engine.module.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p.float(), q, atol=tolerance)


@pytest.mark.slow
def test_engine_compile_keeps_parameter_names(process_group):
    """`train.compile` calls DeepSpeed's `engine.compile()` (torch.compile of the module in place, inductor):
    steps still train and the parameter names our checkpoints and EMA read are unchanged."""
    engine = _engine(0)
    names = [name for name, _ in engine.module.named_parameters()]
    engine.compile()
    losses = []
    for _ in range(3):
        loss = engine(torch.ones(1, 4)).pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    assert engine.is_compiled and [name for name, _ in engine.module.named_parameters()] == names
    assert losses[-1] < losses[0]
