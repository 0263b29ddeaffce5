"""Run configuration: dataclasses, YAML files, key=value overrides, validation.

This is the one place where bad configuration becomes a clear ConfigError.
"""
import dataclasses
import math
import os
import re
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class UserError(Exception):
    """Bad input (config, CLI, data, checkpoint, run dir): the CLIs print its one-line message and exit 2."""


def clip(text: str, limit: int = 100) -> str:
    """Another library's message in a UserError's one line: its first line, cut after the last
    sentence that fits (if that keeps half of it), or else at a word, or else at `limit` characters."""
    first = (text.splitlines() or [""])[0].strip()
    if len(first) <= limit:
        return first
    sentence_end = first.rfind(". ", 0, limit)
    if sentence_end >= limit // 2:
        return first[:sentence_end + 1]
    placeholder = " ..."
    at_word = textwrap.shorten(first, limit, placeholder=placeholder)
    return at_word if at_word != placeholder.strip() else first[:limit - len(placeholder)] + placeholder


def describe(error: BaseException, limit: int = 100) -> str:
    """An exception in a UserError's one line: its type and its message's first line, clipped (an
    empty message, such as a 0-byte file's EOFError(''), leaves the type alone)."""
    first = clip(str(error), limit)
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


class ConfigError(UserError):
    """A configuration the toolkit cannot run; the message says what is wrong and what to do."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last, silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                continue  # SafeLoader's own check says so
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping; keep one",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


@dataclass
class ModelConfig:
    base_channels: int = 64
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 4])
    time_embed_dim: int = 256
    time_hidden_mult: int = 4
    num_heads: int = 1
    attention_resolutions: list[int] = field(default_factory=lambda: [8])
    kernels: str = "auto"      # GroupNorm+SiLU: auto (triton on CUDA, but torch on sm80+ without CUDA graphs) | torch | triton
    attention: str = "auto"    # attention core: auto (triton for 16-bit on sm80+ with CUDA graphs, else torch) | torch | sdpa | triton


@dataclass
class DiffusionConfig:
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02


@dataclass
class DataConfig:
    dataset: str = "mnist"     # mnist | fashion_mnist
    source: str = "auto"       # auto | idx | torchvision | offline_subset
    dir: str = "data"
    image_size: int = 32
    resize: str = "bilinear"   # bilinear (28 -> 32, the seed) | pad (2 black pixels each side)
    loader: str = "resident"   # resident (on the device) | dali (NVIDIA DALI, the [dali] extra) | dataloader


@dataclass
class TrainConfig:
    steps: int = 37_500
    batch_size: int = 64
    lr: float = 1e-4
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    grad_clip: float = 0.0     # max gradient norm; 0 disables (the seed)
    warmup_steps: int = 0
    ema_decay: float = 0.9999
    ema_warmup: bool = True    # decay of update k: min(ema_decay, (1 + k) / (10 + k)); false: ema_decay throughout
    seed: int = 0
    device: str = "auto"       # auto | cpu | cuda | cuda:N
    # The fast path: auto = bf16 (fp16 + GradScaler on a T4) and torch.compile on CUDA (with CUDA graphs,
    # reduce-overhead, on one GPU); fp32 eager on CPU.
    precision: str = "auto"    # auto | fp32 | fp16 (autocast + GradScaler) | bf16 (autocast)
    compile: str = "auto"      # torch.compile mode of the UNet: auto | none | default | max-autotune | reduce-overhead
    log_every: int = 100
    sample_every: int = 2500   # sample grid to TensorBoard; 0 disables
    eval_every: int = 0        # quick sample-quality score (1,000 DDIM samples) to TensorBoard; 0 disables
    checkpoint_every: int = 2500
    out_dir: str = "runs/mnist"


@dataclass
class SampleConfig:
    sampler: str = "ddpm"      # ddpm (ancestral, T steps) | ddim
    steps: int = 50            # DDIM steps
    eta: float = 0.0           # DDIM noise: 0 deterministic, 1 = ancestral with the posterior variance
    variance: str = "beta"     # DDPM sigma_t^2: beta (the seed) | posterior (beta tilde)
    clip_x0: bool = True       # clip the predicted x0 to [-1, 1] (Ho et al.); the seed did not
    precision: str = "auto"    # as train.precision
    compile: str = "auto"      # torch.compile of the whole denoising step (UNet + update): auto | none | default | max-autotune
    cuda_graph: str = "auto"   # capture the step once, replay it every step: auto (= enabled on CUDA) | enabled | disabled
    streams: int = 1           # the batch in this many parts, replayed as parallel branches of the graph
    num_images: int = 64


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "model.kernels": ("auto", "torch", "triton"),
    "model.attention": ("auto", "torch", "sdpa", "triton"),
    "data.dataset": ("mnist", "fashion_mnist"),
    "data.source": ("auto", "idx", "torchvision", "offline_subset"),
    "data.resize": ("bilinear", "pad"),
    "data.loader": ("resident", "dali", "dataloader"),
    "train.precision": ("auto", "fp32", "fp16", "bf16"),
    "train.compile": ("auto", "none", "default", "max-autotune", "reduce-overhead"),
    "sample.precision": ("auto", "fp32", "fp16", "bf16"),
    "sample.compile": ("auto", "none", "default", "max-autotune"),
    "sample.sampler": ("ddpm", "ddim"),
    "sample.cuda_graph": ("auto", "enabled", "disabled"),
    "sample.variance": ("beta", "posterior"),
}


def _coerce(value, annotation, key: str):
    """Check a YAML value against a dataclass field's type; ints are accepted where floats are."""
    origin = typing.get_origin(annotation)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list of {item_type.__name__}, got {value!r}")
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" as a string
            value = float(value)
        except ValueError:
            pass
    if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {annotation.__name__}, got {value!r} ({type(value).__name__})")
    if annotation is int and not -2 ** 63 <= value < 2 ** 63:
        raise ConfigError(f"{key} is too large: {value}")
    if annotation is float and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return value


class _OverrideText(str):
    """A key=value override's value as typed: a text setting takes it as it is (yes, 2024 and an
    empty value stay text; outer spaces and quotes, as YAML's, are taken off), any other is read as YAML."""

    def as_text(self) -> str:
        quoted = len(self) >= 2 and self[0] == self[-1] and self[0] in "'\""
        value = self.as_yaml() if quoted else str(self).strip()
        return value if isinstance(value, str) else str(self)

    def as_yaml(self):
        try:
            return yaml.safe_load(str(self))
        except yaml.YAMLError:
            return str(self)


def _merge(obj, values: dict, prefix: str = ""):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for name, value in values.items():
        key = prefix + str(name)
        if name not in fields:
            raise ConfigError(f"unknown config key '{key}'; valid keys here: {', '.join(fields)}")
        if isinstance(value, _OverrideText):
            typed, value = str(value), value.as_text() if hints[name] is str else value.as_yaml()
            # YAML's readings of '', yes and no: what was typed says more
            if not dataclasses.is_dataclass(hints[name]) and (value is None or (isinstance(value, bool)
                                                                                 and hints[name] is not bool)):
                raise ConfigError(f"{key} must be {getattr(hints[name], '__name__', hints[name])}, got {typed!r}")
        if dataclasses.is_dataclass(hints[name]):
            _merge(getattr(obj, name), value, key + ".")
        else:
            setattr(obj, name, _coerce(value, hints[name], key))


def _parse_override(text: str) -> dict:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not key=value (e.g. train.steps=1000)")
    key, raw = text.split("=", 1)
    value = _OverrideText(raw)
    nested: dict = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def from_dict(values: dict) -> Config:
    cfg = Config()
    _merge(cfg, values or {})
    _expand_home(cfg)
    validate(cfg)
    return cfg


def _expand_home(cfg: Config) -> None:
    """~ in the paths, as a shell would (YAML and key=value overrides are not expanded by one)."""
    cfg.train.out_dir = os.path.expanduser(cfg.train.out_dir)
    cfg.data.dir = os.path.expanduser(cfg.data.dir)


def load(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """The config file (or the defaults) with key=value overrides applied, validated."""
    cfg = Config()
    if path is not None:
        if not str(path).strip():  # Path("") would be the current directory
            raise ConfigError("the config file's name is empty; pass a YAML file (see configs/ for examples)")
        path = Path(path)
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise ConfigError(f"config file {path} {what}; pass a YAML file (see configs/ for examples)")
        try:
            values = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
        except yaml.MarkedYAMLError as e:  # what is wrong, and where; str(e) starts with the context
            where = f"line {e.problem_mark.line + 1}: " if e.problem_mark else ""
            raise ConfigError(f"config file {path} is not valid YAML ({where}{e.problem})") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} is not valid YAML ({str(e).splitlines()[0]})") from None
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"config file {path} must be a mapping of sections (model:, train:, ...), "
                              f"got a {type(values).__name__}; see configs/ for examples")
        _merge(cfg, values or {})
    for text in overrides:
        _merge(cfg, _parse_override(text))
    _expand_home(cfg)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    flat = {f"{section}.{k}": v for section, d in cfg.to_dict().items() for k, v in d.items()}
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {flat[key]!r}")

    def require(ok: bool, message: str):
        if not ok:
            raise ConfigError(message)

    m, d, data, tr, s = cfg.model, cfg.diffusion, cfg.data, cfg.train, cfg.sample
    require(m.base_channels > 0, f"model.base_channels must be > 0, got {m.base_channels}")
    require(len(m.channel_mults) >= 2 and all(x > 0 for x in m.channel_mults),
            f"model.channel_mults needs at least 2 positive entries (levels + bottleneck), got {m.channel_mults}")
    require(m.time_embed_dim > 0 and m.time_embed_dim % 2 == 0,
            f"model.time_embed_dim must be a positive even number, got {m.time_embed_dim}")
    require(m.time_hidden_mult > 0, f"model.time_hidden_mult must be > 0, got {m.time_hidden_mult}")
    widths = [m.base_channels * x for x in m.channel_mults]
    require(m.num_heads > 0 and all(w % m.num_heads == 0 for w in widths),
            f"model.num_heads={m.num_heads} must divide every level's width {widths}")
    require(d.timesteps >= 1, f"diffusion.timesteps must be >= 1, got {d.timesteps}")
    require(d.timesteps <= 100_000, f"diffusion.timesteps must be at most 100000, got {d.timesteps}")
    for name in ("beta_start", "beta_end"):
        beta = getattr(d, name)
        require(0.0 < beta < 1.0, f"diffusion.{name} must lie in (0, 1), got {beta}")
    require(d.beta_start <= d.beta_end,
            f"diffusion.beta_start ({d.beta_start}) must not exceed diffusion.beta_end ({d.beta_end})")
    factor = 2 ** (len(m.channel_mults) - 1)
    require(data.image_size > 0 and data.image_size % factor == 0,
            f"data.image_size must be a positive multiple of {factor} (the UNet halves it "
            f"{factor.bit_length() - 1} times), got {data.image_size}")
    require(data.image_size >= 28, f"data.image_size must be >= 28 (the digits are 28x28), got {data.image_size}")
    require(data.resize != "pad" or data.image_size == 32,
            f"data.resize=pad gives 32x32 images; set data.image_size=32 or data.resize=bilinear")
    resolutions = sorted({data.image_size >> i for i in range(len(m.channel_mults))}, reverse=True)
    require(all(r in resolutions for r in m.attention_resolutions),
            f"model.attention_resolutions may name only the UNet's resolutions {resolutions}, "
            f"got {m.attention_resolutions}; set it to some of those (the seed: the smallest, [{resolutions[-1]}])")
    require(tr.steps >= 1, f"train.steps must be >= 1, got {tr.steps}")
    require(0 <= tr.seed < 2 ** 32, f"train.seed must lie in [0, 2**32), got {tr.seed}")
    require(tr.out_dir.strip() != "", "train.out_dir must name a directory, got ''")
    require(tr.batch_size >= 1, f"train.batch_size must be >= 1, got {tr.batch_size}")
    require(0 < tr.lr <= 1, f"train.lr must lie in (0, 1], got {tr.lr}")
    require(len(tr.adam_betas) == 2 and all(0 <= b < 1 for b in tr.adam_betas),
            f"train.adam_betas must be two numbers in [0, 1), got {tr.adam_betas}")
    require(0 <= tr.weight_decay <= 1, f"train.weight_decay must lie in [0, 1], got {tr.weight_decay}")
    require(tr.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 disables), got {tr.grad_clip}")
    require(tr.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {tr.warmup_steps}")
    require(0 <= tr.ema_decay < 1, f"train.ema_decay must lie in [0, 1), got {tr.ema_decay}")
    for name in ("log_every", "checkpoint_every"):
        require(getattr(tr, name) >= 1, f"train.{name} must be >= 1, got {getattr(tr, name)}")
    require(tr.sample_every >= 0, f"train.sample_every must be >= 0 (0 disables), got {tr.sample_every}")
    require(tr.eval_every >= 0, f"train.eval_every must be >= 0 (0 disables), got {tr.eval_every}")
    require(re.fullmatch(r"auto|cpu|cuda(:\d+)?", tr.device) is not None,
            f"train.device must be auto, cpu, cuda or cuda:N, got {tr.device!r}")
    require(1 <= s.steps <= d.timesteps, f"sample.steps must lie in [1, diffusion.timesteps={d.timesteps}], got {s.steps}")
    require(0 <= s.eta <= 1, f"sample.eta must lie in [0, 1] (0: deterministic DDIM, 1: ancestral), got {s.eta}")
    require(s.num_images >= 1, f"sample.num_images must be >= 1, got {s.num_images}")
    require(1 <= s.streams <= 16, f"sample.streams must lie in [1, 16] (1: one stream), got {s.streams}")


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def diff(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    da, db = a.to_dict(), b.to_dict()
    return [f"{s}.{k}" for s in da for k in da[s] if da[s][k] != db[s][k]]
