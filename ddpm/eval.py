"""Sample quality: a Fréchet distance and a KID in the feature space of a small MNIST classifier that
the project trains itself, plus recognizability and the class histogram's distance from uniform.

Why our own classifier: Inception-based FID needs weights downloaded from the internet and measures
ImageNet features on 32x32 grey digits. A CNN trained on the dataset's training split sees exactly
the input the diffusion model produces (32x32 in [-1, 1], data.to_model_input) and runs offline. Its
numbers are comparable between checkpoints of this toolkit, not with published Inception FIDs.

Every score comes with a real-vs-real floor: the same metric between two disjoint sets of real
images of the same size (training split vs test split), so a number means something on its own.
The math is torchmetrics' (FrechetInceptionDistance / KernelInceptionDistance with a custom
feature module); this file supplies the features, the real sets and the sampling.
"""
import dataclasses
import math
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddpm import checkpoint
from ddpm.config import UserError, describe
from ddpm.data import Digits, load_digits, to_model_input
from ddpm.diffusion import Diffusion, usual_ddim_steps
from ddpm.runtime import cache_dir  # $DDPM_CACHE_DIR, else $XDG_CACHE_HOME/ddpm-mnist, else ~/.cache/ddpm-mnist

CLASSIFIER_ARCH = 2          # bump when the network below changes: cached weights are then retrained
CLASSIFIER_STEPS = 3000      # Adam steps of 128 images: 6.4 epochs of 60k (~2 min on one CPU core, seconds on a GPU)
CONFIDENT = 0.9              # "recognizable": the top class probability exceeds this
KID_SUBSET = 1000            # torchmetrics' default subset size; at most half the samples, so subsets differ
OFFLINE_SEED = 0             # the fixed split of the offline subset into two halves
REFERENCE_SEED = 0           # which real images are drawn: the same for every evaluation


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def _own_rng():
    """Weight init and KID's subset draws use torch's global CPU RNG; inside training, evaluation must
    not shift it (resumed runs must match uninterrupted ones), so those draws happen on a forked,
    seeded copy. Nothing here draws from a CUDA RNG: device-side draws take explicit generators."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(REFERENCE_SEED)
        yield


# ---- the classifier ----------------------------------------------------------------------------
class DigitClassifier(nn.Module):
    """Three strided convolutions and two linear layers (189k parameters). forward() returns the 128-d
    penultimate features, which is what torchmetrics calls on a custom feature module; logits()
    returns the class scores. Input: [B, 1, S, S] in [-1, 1], what the diffusion model sees.

    The features are divided by one constant, fixed when the classifier is trained: their RMS over
    the training images, so that they are O(1) like Inception's. A scalar keeps the geometry (FID is
    in units of that RMS squared); it matters for KID, whose kernel (x.y / d + 1)^3 assumes O(1)
    features and is otherwise dominated by its cubic term, with a huge variance."""

    num_features = 128  # torchmetrics reads this instead of probing the module with a dummy image

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Sequential(
            # strided convolutions, not conv + max-pool: a quarter of the compute, so that training
            # it on a CPU takes about two minutes, at the same accuracy
            nn.Conv2d(1, 32, 5, stride=2, padding=2), nn.ReLU(),    # 32 -> 16
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),   # 16 -> 8
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),   # 8 -> 4
            nn.AdaptiveAvgPool2d(4),  # other data.image_size values give a 4x4 map too
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, self.num_features), nn.ReLU())
        self.head = nn.Linear(self.num_features, num_classes)
        self.register_buffer("feature_scale", torch.ones(()))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x.float()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(x) / self.feature_scale

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(x))


@dataclasses.dataclass
class RealSplits:
    """The classifier's training images (also the reference set of every score) and the disjoint
    held-out images (its accuracy and the real-vs-real floor)."""
    key: str            # mnist-full | mnist-offline_subset | fashion_mnist: names the cached classifier
    train: Digits
    held_out: Digits
    description: str


def real_splits(data_cfg) -> RealSplits:
    """MNIST and Fashion-MNIST: the training split and the test split. The offline subset (5,000
    digits, no test split): a fixed class-balanced split into two halves of 2,500."""
    train = load_digits(data_cfg, train=True)
    if train.offline_subset:
        g = torch.Generator().manual_seed(OFFLINE_SEED)
        halves = ([], [])
        for c in range(10):
            idx = (train.labels == c).nonzero().flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            halves[0].append(idx[: len(idx) // 2])
            halves[1].append(idx[len(idx) // 2:])
        a, b = (torch.cat(h).sort().values for h in halves)
        return RealSplits("mnist-offline_subset",
                          Digits(train.images[a], train.labels[a], f"offline subset, half A ({len(a):,})", offline_subset=True),
                          Digits(train.images[b], train.labels[b], f"offline subset, half B ({len(b):,})", offline_subset=True),
                          f"the 5,000-digit offline MNIST subset split (seed {OFFLINE_SEED}) into two disjoint "
                          f"class-balanced halves: A ({len(a):,}) trains the classifier and is the reference, "
                          f"B ({len(b):,}) is held out; the floor compares B with A")
    test = load_digits(data_cfg, train=False)
    if test.offline_subset:
        raise UserError(f"found the {data_cfg.dataset} training split but not its test split "
                        f"(t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]): put them in {data_cfg.dir}")
    key = "mnist-full" if data_cfg.dataset == "mnist" else data_cfg.dataset
    return RealSplits(key, train, test,
                      f"{data_cfg.dataset}: the classifier trains on the training split ({len(train.images):,}), "
                      f"which is also the reference; the floor compares the test split ({len(test.images):,}) with it")


def classifier_path(key: str, data_cfg) -> Path:
    # the classifier must see the diffusion model's input; other sizes or padding get their own file
    prep = "" if (data_cfg.image_size, data_cfg.resize) == (32, "bilinear") else f"-{data_cfg.resize}{data_cfg.image_size}"
    return cache_dir() / f"classifier-{key}{prep}.pt"


@torch.no_grad()
def accuracy(net: DigitClassifier, digits: Digits, data_cfg, device, batch: int = 1000) -> float:
    correct = 0
    for i in range(0, len(digits.images), batch):
        x = to_model_input(digits.images[i:i + batch].to(device), data_cfg.image_size, data_cfg.resize)
        correct += (net.logits(x).argmax(1).cpu() == digits.labels[i:i + batch]).sum().item()
    return correct / len(digits.images)


def train_classifier(splits: RealSplits, data_cfg, device, steps: int = CLASSIFIER_STEPS,
                     batch_size: int = 128, max_shift: int = 2, progress: bool = False) -> tuple[DigitClassifier, float]:
    """Adam on the training images (resident on the device, a fresh permutation per epoch), with
    random shifts of up to max_shift pixels so that slightly off-centre samples are still read; then
    the feature scale. Returns the network and its held-out accuracy."""
    from tqdm import tqdm
    with _own_rng():
        net = DigitClassifier().to(device)
        images, labels = splits.train.images.to(device), splits.train.labels.to(device)
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.15)
        g = torch.Generator(device).manual_seed(0)
        perm, pos = None, len(images)
        net.train()
        for _ in tqdm(range(steps), desc="training the evaluation classifier", disable=not progress, leave=False):
            if pos + batch_size > len(images):
                perm, pos = torch.randperm(len(images), generator=g, device=device), 0
            idx = perm[pos:pos + batch_size]
            pos += batch_size
            x = to_model_input(images[idx], data_cfg.image_size, data_cfg.resize)
            shift = torch.randint(-max_shift, max_shift + 1, (len(idx), 2), generator=g, device=device).float() * 2 / x.shape[-1]
            theta = torch.zeros(len(idx), 2, 3, device=device)
            theta[:, 0, 0] = theta[:, 1, 1] = 1.0
            theta[:, :, 2] = shift
            grid = F.affine_grid(theta, x.shape, align_corners=False)
            x = F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1  # background stays -1
            loss = F.cross_entropy(net.logits(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        sub = splits.train.images[:10_000].to(device)
        h = torch.cat([net.hidden(to_model_input(sub[i:i + 1000], data_cfg.image_size, data_cfg.resize))
                       for i in range(0, len(sub), 1000)])
        net.feature_scale.fill_(h.square().mean().sqrt().clamp(min=1e-6).item())
    return net, accuracy(net, splits.held_out, data_cfg, device)


def get_classifier(data_cfg, device, splits: RealSplits, steps: int = CLASSIFIER_STEPS, progress: bool = False,
                   log=_stderr) -> DigitClassifier:
    """The classifier of the dataset whose real_splits() are `splits`, from the cache dir; trained on
    them and cached first if it is not there (or the cached file is unreadable or of an older
    architecture: then it is retrained, said once)."""
    device = torch.device(device)
    key = splits.key
    path = classifier_path(key, data_cfg)
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state.get("arch") != CLASSIFIER_ARCH or state.get("key") != key:
                raise ValueError(f"written for {state.get('key')} by classifier version {state.get('arch')}")
            with _own_rng():  # the initial weights, about to be overwritten, draw from the RNG
                net = DigitClassifier()
            net.load_state_dict(state["weights"])
            return net.to(device).eval().requires_grad_(False)
        except Exception as e:  # truncated, foreign or stale: retraining costs seconds to minutes, a crash costs the run
            log(f"evaluation classifier {path} is unusable ({describe(e)}); retraining it")
    try:  # before minutes of training, not after
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot cache the evaluation classifier in {path.parent} ({e.strerror}); set "
                        f"DDPM_CACHE_DIR to a writable directory") from None
    log(f"training the evaluation classifier for {key} ({steps} steps on {len(splits.train.images):,} images, "
        f"device {device}); cached at {path} afterwards")
    start = time.perf_counter()
    net, acc = train_classifier(splits, data_cfg, device, steps, progress=progress)
    seconds = time.perf_counter() - start
    log(f"evaluation classifier: {acc:.2%} accuracy on {splits.held_out.description} after {seconds:.0f} s")
    checkpoint.save({"arch": CLASSIFIER_ARCH, "key": key, "weights": net.state_dict(), "accuracy": acc,
                     "held_out": splits.held_out.description, "steps": steps, "seconds": seconds}, path)
    return net.requires_grad_(False)


class _InceptionOnDigits(nn.Module):
    """torchmetrics' InceptionV3 (torch-fidelity's FID port, pool3 features) fed our [-1, 1] grey
    images as the uint8 RGB it expects; it resizes to 299x299 itself."""
    num_features = 2048

    def __init__(self):
        super().__init__()
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
            self.inception = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
        except ModuleNotFoundError:
            raise UserError("--inception needs torch-fidelity: pip install torch-fidelity") from None
        except Exception as e:  # the weights come from github.com on first use
            raise UserError(f"--inception could not load the InceptionV3 weights ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:100]}); it needs the network once; offline, leave --inception out") from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).expand(-1, 3, -1, -1)
        return self.inception(rgb)


# ---- the scores ------------------------------------------------------------------------------
def class_histogram_tv(predicted: torch.Tensor, num_classes: int = 10) -> float:
    """Total variation distance between the predicted-class histogram and uniform: 0 for a balanced
    set, 1 - 1/num_classes (0.9) when every image is read as the same class."""
    hist = torch.bincount(predicted.flatten().cpu(), minlength=num_classes).double() / predicted.numel()
    return 0.5 * (hist - 1.0 / num_classes).abs().sum().item()


class Scorer:
    """Everything the scores need except the samples: the classifier, the metrics (with the real
    reference's features already in them) and the held-out real set for the floor. Built once,
    it scores any number of sample sets of its size (quick_score keeps one between calls)."""

    def __init__(self, data_cfg, device, num_samples: int, inception: bool = False,
                 classifier_steps: int = CLASSIFIER_STEPS, progress: bool = False, log=_stderr):
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance
        if num_samples < 2:
            raise UserError(f"evaluation needs at least 2 samples (a covariance), got {num_samples}")
        self.device, self.data_cfg, self.num_samples = torch.device(device), data_cfg, num_samples
        inception_features = _InceptionOnDigits().to(self.device).eval() if inception else None  # fails first
        splits = real_splits(data_cfg)
        self.classifier = get_classifier(data_cfg, self.device, splits, classifier_steps, progress, log)
        g = torch.Generator().manual_seed(REFERENCE_SEED)
        pick = lambda d: d.images[torch.randperm(len(d.images), generator=g)[:num_samples]]  # noqa: E731
        self.reference, self.floor_images = pick(splits.train), pick(splits.held_out)
        self.feature_extractor = ("torchmetrics' InceptionV3 (pool3, 2048-d)" if inception else
                                  f"the project's {splits.key} classifier (penultimate layer, 128-d)")
        self.description = splits.description
        features = inception_features if inception else self.classifier
        subset = min(KID_SUBSET, max(2, min(num_samples, len(self.reference), len(self.floor_images)) // 2))
        with warnings.catch_warnings():  # KID warns that it keeps every feature vector: 10,000 x 128 floats here
            warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer")
            # reset_real_features=False: reset() drops the generated features and keeps the reference's,
            # so samples and floor are measured against the very same real features.
            # sync_on_compute=False: under DDP rank 0 alone scores (train.eval_every), and a compute()
            # that gathered from the other ranks would wait for them while they wait in DDP's all-reduce
            self.fid = FrechetInceptionDistance(feature=features, reset_real_features=False,
                                                sync_on_compute=False).to(self.device)
            self.kid = KernelInceptionDistance(feature=features, subset_size=subset, reset_real_features=False,
                                               sync_on_compute=False).to(self.device)
        with torch.no_grad():
            for x in self._batches(self.reference):
                self.fid.update(x, real=True)
                self.kid.update(x, real=True)
        self.floor = self.score(self._batches(self.floor_images))

    def _batches(self, images: torch.Tensor, batch: int = 1000):
        for i in range(0, len(images), batch):
            yield to_model_input(images[i:i + batch].to(self.device), self.data_cfg.image_size, self.data_cfg.resize)

    @torch.no_grad()
    def score(self, batches) -> dict:
        """FID, KID (mean and std over subsets), recognizability and class-histogram TV of images
        in [-1, 1] against the reference; batches is any iterable of [B, 1, S, S] tensors."""
        self.fid.reset()
        self.kid.reset()
        confident, predicted = [], []
        for x in batches:
            x = x.to(self.device).float().clamp(-1, 1)  # what a saved picture would show
            self.fid.update(x, real=False)
            self.kid.update(x, real=False)
            probs = self.classifier.logits(x).softmax(1)
            confident.append(probs.max(1).values > CONFIDENT)
            predicted.append(probs.argmax(1))
        confident, predicted = torch.cat(confident), torch.cat(predicted)
        with _own_rng():
            kid_mean, kid_std = self.kid.compute()
        return {"fid": self.fid.compute().item(), "kid": kid_mean.item(), "kid_std": kid_std.item(),
                "recognizable": confident.float().mean().item(), "class_tv": class_histogram_tv(predicted),
                "num": len(predicted)}


# ---- sampling and evaluation -------------------------------------------------------------------
def sample_batches(net, cfg, device, num_samples: int, sampler: str, steps: int, batch_size: int,
                   seed: int, progress: bool = False):
    """Check the arguments now, then return a generator of num_samples images in batches from the
    model with the given sampler (DDIM on `steps` timesteps, or DDPM over all T); one seeded
    generator draws the whole stream, so a seed names one set of samples. The denoising step is
    sample.py's (ddpm.sample.FastStep with cfg.sample's precision / compile / cuda_graph: compiled,
    bf16 and graph-replayed on CUDA by default, eager fp32 on a CPU), so the scores measure the
    samples that path produces."""
    check_sampling(cfg, num_samples, sampler, steps, batch_size)
    return _sample_stream(net, cfg, device, num_samples, sampler, steps, batch_size, seed, progress)


def check_sampling(cfg, num_samples: int, sampler: str, steps: int, batch_size: int) -> None:
    """Bad sampling arguments fail here, before minutes of classifier training or sampling."""
    if num_samples < 2:
        raise UserError(f"evaluation needs at least 2 samples (a covariance), got {num_samples}")
    if sampler not in ("ddim", "ddpm"):
        raise UserError(f"sampler must be ddim or ddpm, got {sampler!r}")
    if sampler == "ddim" and not 1 <= steps <= cfg.diffusion.timesteps:
        raise UserError(f"DDIM steps must lie in [1, diffusion.timesteps={cfg.diffusion.timesteps}], got {steps}")
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")


def _sample_stream(net, cfg, device, num_samples, sampler, steps, batch_size, seed, progress):
    from tqdm import tqdm
    from ddpm.sample import FastStep
    diffusion = Diffusion.from_config(cfg.diffusion, device)
    s = dataclasses.replace(cfg.sample, sampler=sampler, steps=steps)
    plan = diffusion.plan(s)
    generator = torch.Generator(device).manual_seed(seed)
    size = cfg.data.image_size
    n_steps = len(plan.timesteps)
    bar = tqdm(total=math.ceil(num_samples / batch_size) * n_steps, unit="step", disable=not progress,
               desc=f"sampling {num_samples:,} ({sampler}, {n_steps} steps, batches of {min(batch_size, num_samples)})")
    fast_steps = {}  # a captured CUDA graph has one batch size: a shorter last batch gets its own

    try:
        for start in range(0, num_samples, batch_size):
            b = min(batch_size, num_samples - start)
            if b not in fast_steps:
                fast_steps[b] = FastStep.from_config(net, plan, s, device)

            def step(i, x, noise, fast=fast_steps[b]):  # the bar moves once per denoising step
                bar.update(1)
                return fast(i, x, noise)

            x, _ = diffusion.sample(net, (b, 1, size, size), plan, s.clip_x0, generator, 0, step)
            yield x
    finally:
        bar.close()


def as_uint8_nhwc(x: torch.Tensor) -> torch.Tensor:
    """Samples in [-1, 1] as the pictures hold them: uint8 [N, H, W, 1] on the CPU (the layout of
    guided-diffusion's sample .npz files, which FID tools read)."""
    from ddpm.sample import to_unit
    return to_unit(x.float()).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def _keeping(batches, kept: list):
    for x in batches:
        kept.append(as_uint8_nhwc(x))
        yield x


def evaluate(net, cfg, device, num_samples: int = 10_000, sampler: str = "ddim", steps: int = 50,
             batch_size: int = 500, seed: int = 0, progress: bool = True, scorer: Scorer | None = None,
             log=_stderr, kept: list | None = None) -> dict:
    """Sample num_samples images and score them; every score has its real-vs-real floor beside it
    (floor_* keys, same sample count where the held-out set is large enough). All values are numbers.
    kept: a list that receives the scored samples, batch by batch (as_uint8_nhwc)."""
    device = torch.device(device)
    batches = sample_batches(net, cfg, device, num_samples, sampler, steps, batch_size, seed, progress)  # checks the arguments
    if kept is not None:
        batches = _keeping(batches, kept)
    scorer = scorer or Scorer(cfg.data, device, num_samples, progress=progress, log=log)
    was_training = net.training
    net.eval()
    start = time.perf_counter()
    try:
        scores = scorer.score(batches)
    finally:
        net.train(was_training)
    result = {k: v for k, v in scores.items() if k != "num"}
    result.update({f"floor_{k}": v for k, v in scorer.floor.items() if k != "num"})
    result.update(num_samples=scores["num"], num_reference=len(scorer.reference),
                  floor_num_samples=scorer.floor["num"], seconds=time.perf_counter() - start)
    return result


_QUICK: dict = {}  # one Scorer kept between quick_score calls: the classifier and the real features


def quick_score(net, cfg, device, num_samples: int = 1000) -> dict:
    """A cheap score for training to log every train.eval_every steps: DDIM-50 samples from net (pass
    the EMA model), no progress bar, the global RNG untouched. Returns evaluate()'s keys. The step is
    eager fp32: compiling and capturing it anew at every call would cost more than the sampling, and
    the training curve should follow the model, not the sampling path."""
    device = torch.device(device)
    eager = {"precision": "fp32", "compile": "none", "cuda_graph": "disabled"}
    cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, **eager))
    key = (dataclasses.astuple(cfg.data), str(device), num_samples)
    if key not in _QUICK:
        _QUICK.clear()
        _QUICK[key] = Scorer(cfg.data, device, num_samples)
    return evaluate(net, cfg, device, num_samples, "ddim", usual_ddim_steps(cfg.diffusion.timesteps),
                    batch_size=min(500, num_samples), seed=0, progress=False, scorer=_QUICK[key])
