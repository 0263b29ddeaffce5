"""The three loaders (data.loader = resident | dali | dataloader) give the same batches (on the CPU; the resident
one on CUDA too)."""
import builtins

import pytest
import torch

from ddpm import config, data

KINDS = ["resident", "dataloader", "dali"]
STEPS = 12  # 2.4 epochs of 5 steps: crosses two epoch boundaries


def needs(kind):
    if kind == "dali":
        pytest.importorskip("nvidia.dali", reason="data.loader=dali needs NVIDIA DALI (the [dali] extra)")


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (40, 28, 28), generator=g, dtype=torch.uint8)  # 5 steps of 8 per epoch


def loader(kind, images, resize, rank=0, world_size=1, batch=8, seed=3):
    return data.make_loader(kind, images, batch, seed, "cpu", 32, resize, rank, world_size)


def test_config_accepts_every_loader():
    for kind in KINDS:
        assert config.load(None, [f"data.loader={kind}"]).data.loader == kind
    with pytest.raises(config.ConfigError, match="data.loader must be one of resident, dali, dataloader"):
        config.load(None, ["data.loader=ffcv"])


def test_every_loader_follows_one_shared_order():
    a = data.BatchOrder(40, 8, seed=3)
    assert torch.equal(a.permutation(1), data.epoch_permutation(40, 3, 1))
    assert not torch.equal(a.permutation(0), a.permutation(1))


def test_the_order_is_drawn_on_the_cpu_whatever_device_takes_it():
    """Past some size a CUDA randperm depends on the card's SM count (which caps its random keys'
    grid), so DDP ranks on two GPU models could read overlapping shards. A meta device has no
    generator: drawing there fails."""
    order = data.BatchOrder(40, 8, seed=3, rank=1, world_size=2, device="meta")
    indices = order.indices(6)
    assert indices.device.type == "meta" and indices.shape == (4,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the resident loader's CUDA order")
@pytest.mark.parametrize("world_size", [1, 2])
def test_the_resident_loader_on_cuda_takes_the_cpu_loaders_batches(images, world_size):
    for rank in range(world_size):
        on_gpu = data.make_loader("resident", images, 8, 3, "cuda", 32, "pad", rank, world_size)
        on_cpu = loader("dataloader", images, "pad", rank, world_size)
        for step in range(STEPS):
            assert torch.equal(on_gpu.batch(step).cpu(), on_cpu.batch(step)), f"rank {rank}, step {step}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("resize", ["pad", "bilinear"])
def test_batches_equal_the_resident_loaders(kind, resize, images):
    needs(kind)
    reference, candidate = loader("resident", images, resize), loader(kind, images, resize)
    assert (candidate.steps_per_epoch, candidate.local_batch, candidate.offset) == (5, 8, 0)
    for step in range(STEPS):
        x = candidate.batch(step)
        assert x.shape == (8, 1, 32, 32) and x.dtype == torch.float32 and x.device.type == "cpu"
        if resize == "pad":  # the same arithmetic: bit-exact
            assert torch.equal(x, reference.batch(step)), f"step {step}"
        else:  # DALI's linear resize agrees with F.interpolate to float rounding (max 1.2e-7 seen)
            torch.testing.assert_close(x, reference.batch(step), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_a_fresh_loader_resumes_at_any_step(kind, images):
    needs(kind)
    run = loader(kind, images, "pad")
    from_zero = [run.batch(step) for step in range(STEPS)]
    for k in (7, 3, 10):  # a resumed run's first step, then the steps after it
        fresh = loader(kind, images, "pad")
        for step in range(k, k + 2):
            assert torch.equal(fresh.batch(step), from_zero[step]), f"resumed at {k}, step {step}"
    assert torch.equal(run.batch(2), from_zero[2])  # and going back restarts too


@pytest.mark.parametrize("kind", KINDS)
def test_ranks_read_disjoint_shards_that_make_up_the_global_batch(kind, images):
    needs(kind)
    whole = loader(kind, images, "pad")
    ranks = [loader(kind, images, "pad", rank=r, world_size=2) for r in (0, 1)]
    assert [(r.local_batch, r.offset) for r in ranks] == [(4, 0), (4, 4)]
    for step in range(STEPS):
        torch.testing.assert_close(torch.cat([r.batch(step) for r in ranks]), whole.batch(step), rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_loaders_reject_impossible_batches(kind):
    needs(kind)
    images = torch.zeros(10, 28, 28, dtype=torch.uint8)
    with pytest.raises(data.DataError, match="fewer than one batch"):
        data.make_loader(kind, images, 16, 0, "cpu")
    with pytest.raises(data.DataError, match="divisible by the number of processes"):
        data.make_loader(kind, images, 5, 0, "cpu", world_size=2)


def test_missing_dali_says_how_to_install_it(images, monkeypatch):
    real_import = builtins.__import__

    def no_dali(name, *args, **kwargs):
        if name.startswith("nvidia.dali"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dali)
    with pytest.raises(data.DataError, match=r"pip install nvidia-dali-cuda130 \(CUDA 13\) or nvidia-dali-cuda120 \(CUDA 12\)"):
        loader("dali", images, "pad")


def test_unknown_loader_is_a_data_error(images):
    with pytest.raises(data.DataError, match="data.loader must be one of"):
        loader("ffcv", images, "pad")
