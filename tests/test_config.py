from pathlib import Path

import pytest
import yaml

from ddpm import config


@pytest.mark.parametrize("path", sorted(Path("configs").glob("*.yaml")))
def test_shipped_configs_are_valid(path):
    config.load(path)


def test_overrides_are_typed_and_nested():
    cfg = config.load("configs/mnist.yaml", ["train.steps=7", "train.lr=3e-4", "model.channel_mults=[1,2]",
                                             "model.attention_resolutions=[16]",
                                             "sample.clip_x0=false", "diffusion.beta_start=1e-4"])
    assert cfg.train.steps == 7 and cfg.train.lr == 3e-4 and cfg.model.channel_mults == [1, 2]
    assert cfg.sample.clip_x0 is False and cfg.diffusion.beta_start == 1e-4
    # a text setting takes the text as typed (YAML would read 2024 as a number, yes as true), less quotes
    texts = config.load("configs/mnist.yaml", ["train.out_dir=2024", "data.dir= yes ", "sample.cuda_graph='enabled'"])
    assert (texts.train.out_dir, texts.data.dir, texts.sample.cuda_graph) == ("2024", "yes", "enabled")
    assert config.load("configs/mnist.yaml", ["train.out_dir=runs/lr=1e-3"]).train.out_dir == "runs/lr=1e-3"


def test_seed_config_matches_the_seed():
    cfg = config.load("configs/mnist.yaml")
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.steps) == (64, 1e-4, 37_500)
    assert (cfg.diffusion.timesteps, cfg.diffusion.beta_start, cfg.diffusion.beta_end) == (1000, 1e-4, 0.02)
    # the seed (shared/seed/FACTS.md): plain Adam, no gradient clipping, no warm-up; no scoring during training
    tr, s = cfg.train, cfg.sample
    assert (tr.weight_decay, tr.grad_clip, tr.warmup_steps, tr.eval_every) == (0, 0, 0, 0)
    # sampling: DDIM's documented defaults, one stream, a grid of 64
    assert (s.steps, s.eta, s.streams, s.num_images) == (50, 0, 1, 64)


@pytest.mark.parametrize("override, message", [
    ("train.bogus=1", "unknown config key 'train.bogus'"),
    ("bogus.x=1", "unknown config key 'bogus'"),
    ("train.batch_size=0", "train.batch_size must be >= 1"),
    ("train.batch_size=-3", "train.batch_size must be >= 1"),
    ("train.batch_size=abc", "train.batch_size must be int"),
    ("train.batch_size=2.5", "train.batch_size must be int"),
    ("train.steps=true", "train.steps must be int, got 'true'"),
    ("sample.eta=", "sample.eta must be float, got ''"),
    ("sample.cuda_graph=yes", "sample.cuda_graph must be one of auto, enabled, disabled, got 'yes'"),
    ("train.lr=fast", "train.lr must be float"),
    ("sample.clip_x0=3", "sample.clip_x0 must be bool"),
    ("diffusion.timesteps=0", "diffusion.timesteps must be >= 1"),
    ("diffusion.beta_end=1.5", "diffusion.beta_end must lie in (0, 1)"),
    ("diffusion.beta_start=0", "diffusion.beta_start must lie in (0, 1)"),
    ("data.image_size=30", "data.image_size must be a positive multiple of 4 (the UNet halves it 2 times), got 30"),
    ("model.kernels=cuda", "model.kernels must be one of"),
    ("model.channel_mults=5", "model.channel_mults must be a list"),
    ("model.num_heads=3", "model.num_heads=3 must divide every level's width [64, 128, 256]"),
    ("train.steps", "is not key=value"),
    ("train.lr=inf", "train.lr must be a finite number"),
    ("sample.eta=.nan", "sample.eta must be a finite number"),
    ("train.device=cudafoo", "train.device must be auto, cpu, cuda or cuda:N"),
    ("model.base_channels=0", "model.base_channels must be > 0"),
    ("model.time_hidden_mult=0", "model.time_hidden_mult must be > 0"),
    ("data.image_size=24", "data.image_size must be >= 28"),
    ("train.steps=0", "train.steps must be >= 1"),
    ("train.lr=0", "train.lr must lie in (0, 1]"),
    ("train.lr=1e300", "train.lr must lie in (0, 1]"),  # Adam's update overflowed fp32 at the first step
    ("train.weight_decay=-0.1", "train.weight_decay must lie in [0, 1]"),
    ("train.weight_decay=1e308", "train.weight_decay must lie in [0, 1]"),
    ("train.grad_clip=-1", "train.grad_clip must be >= 0"),
    ("train.warmup_steps=-1", "train.warmup_steps must be >= 0"),
    ("train.ema_decay=1", "train.ema_decay must lie in [0, 1)"),
    ("train.log_every=0", "train.log_every must be >= 1"),
    ("train.checkpoint_every=0", "train.checkpoint_every must be >= 1"),
    ("train.sample_every=-1", "train.sample_every must be >= 0"),
    ("train.eval_every=-500", "train.eval_every must be >= 0"),
    ("sample.steps=0", "sample.steps must lie in [1, diffusion.timesteps=1000]"),
    ("sample.steps=1001", "sample.steps must lie in [1, diffusion.timesteps=1000]"),
    ("sample.eta=-0.5", "sample.eta must lie in [0, 1]"),
    ("sample.eta=1.5", "sample.eta must lie in [0, 1]"),
    ("model.attention_resolutions=[5]", "model.attention_resolutions may name only the UNet's resolutions [32, 16, 8], "
                                        "got [5]; set it to some of those (the seed: the smallest, [8])"),
    ("train.seed=-1", "train.seed must lie in [0, 2**32)"),
    ("train.seed=99999999999999999999", "train.seed is too large"),
    ("train.out_dir=''", "train.out_dir must name a directory"),
    ("diffusion.timesteps=1000000", "diffusion.timesteps must be at most 100000"),
    ("diffusion.timesteps=100001", "diffusion.timesteps must be at most 100000"),
    ("train.steps=9223372036854775808", "train.steps is too large"),  # 2**63
    ("train.warmup_steps=-9223372036854775809", "train.warmup_steps is too large"),  # -2**63 - 1
    ("train.lr=1.01", "train.lr must lie in (0, 1]"),
    ("train.weight_decay=1.01", "train.weight_decay must lie in [0, 1]"),
    ("diffusion.beta_end=1.0", "diffusion.beta_end must lie in (0, 1)"),
    ("train.seed=4294967296", "train.seed must lie in [0, 2**32)"),
    ("model.time_embed_dim=0", "model.time_embed_dim must be a positive even number"),
    ("model.num_heads=0", "model.num_heads=0 must divide"),
    ("sample.num_images=0", "sample.num_images must be >= 1"),
    ("sample.streams=0", "sample.streams must lie in [1, 16]"),
    ("sample.streams=17", "sample.streams must lie in [1, 16]"),
    ("model.time_embed_dim=255", "model.time_embed_dim must be a positive even number"),
    ("model.channel_mults=[1]", "model.channel_mults needs at least 2 positive entries"),
    ("model.channel_mults=[1,0]", "model.channel_mults needs at least 2 positive entries"),
    ("train.adam_betas=[0.9]", "train.adam_betas must be two numbers in [0, 1)"),
    ("train.adam_betas=[0.9,1.0]", "train.adam_betas must be two numbers in [0, 1)"),
    ("diffusion.beta_start=0.03", "diffusion.beta_start (0.03) must not exceed diffusion.beta_end (0.02)"),
])
def test_bad_values_raise_one_clear_line(override, message):
    with pytest.raises(config.ConfigError, match=None) as err:
        config.load("configs/mnist.yaml", [override])
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides", [
    ["diffusion.timesteps=1", "sample.steps=1"], ["diffusion.timesteps=100000"], ["sample.steps=1000"],
    ["diffusion.beta_start=0.02"], ["model.base_channels=1", "model.time_hidden_mult=1", "model.time_embed_dim=2"],
    ["data.image_size=28", "data.resize=bilinear", "model.channel_mults=[1,2,2]", "model.attention_resolutions=[7]"],
    ["train.steps=1", "train.batch_size=1", "train.log_every=1", "train.checkpoint_every=1"],
    ["train.lr=1", "train.weight_decay=1", "train.grad_clip=0", "train.warmup_steps=0", "train.ema_decay=0",
     "train.adam_betas=[0,0]", "train.sample_every=0", "train.eval_every=0", "train.seed=0"],
    ["train.seed=4294967295", "sample.eta=1", "sample.num_images=1", "sample.streams=16", "model.num_heads=64"],
    ["sample.eta=0", "sample.streams=1"], ["model.channel_mults=[1,2,2,2]"]], ids=lambda overrides: " ".join(overrides))
def test_the_edges_of_each_range_are_valid(overrides):
    """The values next to those test_bad_values_raise_one_clear_line refuses."""
    cfg = config.load("configs/mnist.yaml", overrides)
    for override in overrides:
        key, value = override.split("=")
        section, name = key.split(".")
        setting = getattr(getattr(cfg, section), name)
        assert (list(setting) if isinstance(setting, tuple) else setting) == yaml.safe_load(value)


def test_a_key_left_out_takes_the_seeds_value():
    """The dataclasses' defaults are configs/mnist.yaml's settings, every one."""
    defaults, seed = config.Config(), config.load("configs/mnist.yaml")
    assert config.diff(defaults, seed) == [] and defaults.to_dict() == seed.to_dict()
    assert config.load(Path("configs/ci.yaml")).model.channel_mults == [1, 2, 2]  # and ci.yaml's keys win


@pytest.mark.parametrize("key", list(config.CHOICES))
def test_every_choice_refuses_a_value_outside_it(key):
    with pytest.raises(config.ConfigError) as err:
        config.load("configs/mnist.yaml", [f"{key}=bogus"])
    assert str(err.value).startswith(f"{key} must be one of {', '.join(config.CHOICES[key])}")


def test_padding_needs_32_pixel_images():
    with pytest.raises(config.ConfigError, match="data.resize=pad"):
        config.load("configs/mnist.yaml", ["data.resize=pad", "data.image_size=64"])
    assert config.load("configs/mnist.yaml", ["data.resize=pad"]).data.resize == "pad"


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load(bad)
    bad.write_text("train: 5\n")
    with pytest.raises(config.ConfigError, match="train must be a mapping"):
        config.load(bad)
    for top_level in ("[]\n", "0\n", "false\n"):  # not the defaults (the seed's 37,500-step run)
        bad.write_text(top_level)
        with pytest.raises(config.ConfigError, match="must be a mapping of sections"):
            config.load(bad)
    bad.write_text("train:\n  steps: 5\n  lr: 1e-3\n  steps: 50\n")
    with pytest.raises(config.ConfigError, match=r"not valid YAML \(line 4: key 'steps' appears twice in one mapping; keep one\)"):
        config.load(bad)
    bad.write_text("train:\n  steps: 5\ntrain:\n  lr: 1e-3\n")
    with pytest.raises(config.ConfigError, match="key 'train' appears twice"):
        config.load(bad)
    bad.write_text("? [a]\n: 1\n")
    with pytest.raises(config.ConfigError, match=r"not valid YAML \(line 1: found unhashable key\)"):
        config.load(bad)
    bad.write_bytes(b"train:\n  steps: \xff\xfe\n")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load(bad)
    with pytest.raises(config.ConfigError, match="is a directory"):
        config.load(tmp_path)


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    """`<<: *anchor` then a key of the anchor's: YAML's override, not a key given twice."""
    path = tmp_path / "merge.yaml"
    path.write_text("x-defaults: &run {steps: 5, lr: 1.0e-3}\ntrain:\n  <<: *run\n  lr: 2.0e-3\n")
    with pytest.raises(config.ConfigError, match="unknown config key 'x-defaults'"):
        config.load(path)  # the loader got as far as the keys
    path.write_text("train: &run {steps: 5, lr: 1.0e-3}\nsample:\n  num_images: 9\n")
    assert config.load(path).train.steps == 5
    path.write_text("train:\n  <<: {steps: 5, lr: 1.0e-3}\n  lr: 2.0e-3\n")
    cfg = config.load(path)
    assert (cfg.train.steps, cfg.train.lr) == (5, 2e-3)


def test_round_trip_through_yaml(tmp_path):
    cfg = config.load("configs/demo.yaml", ["train.seed=3"])
    (tmp_path / "c.yaml").write_text(config.to_yaml(cfg))
    assert config.diff(config.load(tmp_path / "c.yaml"), cfg) == []
    # a checkpoint's config, as a dict
    assert config.diff(config.from_dict(cfg.to_dict()), cfg) == [] and config.diff(cfg, config.Config()) != []


def test_clip_keeps_whole_sentences_or_words():
    assert config.clip("short message\nsecond line") == "short message"
    long = "PytorchStreamReader failed reading zip archive: failed finding central directory. This is an internal error"
    assert config.clip(long, 100) == "PytorchStreamReader failed reading zip archive: failed finding central directory."
    words = "word " * 30
    clipped = config.clip(words, 50)
    assert len(clipped) <= 50 and clipped.endswith("word ...")
    assert config.clip("Error. " + "detail " * 20, 50).startswith("Error. detail")  # not just "Error."
    assert config.clip("x" * 150, 50) == "x" * 46 + " ..."  # no word to cut at


def test_cli_seeds_and_the_write_probe(tmp_path, monkeypatch):
    """--seed takes [0, 2**63); an output file's folder is tried with a real write before the work."""
    import argparse
    import tempfile

    from ddpm import cli
    assert cli.seed("0") == 0 and cli.seed(str(2**63 - 1)) == 2**63 - 1
    for bad in ("-1", str(2**63)):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.seed(bad)
    cli.check_writable(tmp_path / "scores.json", "--json")
    cli.check_writable_dir(tmp_path / "new" / "traces", "--out")  # to be made: its nearest parent is tried
    (tmp_path / "file").write_text("")
    with pytest.raises(config.UserError, match=r"--out .*file/traces: .*file is a file; pass a directory$"):
        cli.check_writable_dir(tmp_path / "file" / "traces", "--out")
    with pytest.raises(config.UserError, match=r"--out .*file: .*file is a file; pass a directory$"):
        cli.check_writable_dir(tmp_path / "file", "--out")  # the file itself, not its folder, is what is refused
    with pytest.raises(config.UserError, match=r"--json .*file/scores.json: .*file is not a directory$"):
        cli.check_writable(tmp_path / "file" / "scores.json", "--json")
    with pytest.raises(config.UserError, match=r"--json .*scores.json: .*missing does not exist$"):
        cli.check_writable(tmp_path / "missing" / "scores.json", "--json")

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(tempfile, "TemporaryFile", refused)  # a chmod would not stop root
    with pytest.raises(config.UserError, match=r"--json .*scores.json: cannot write in .* \(Permission denied\)"):
        cli.check_writable(tmp_path / "scores.json", "--json")
    with pytest.raises(config.UserError, match=r"--out .*new/traces: cannot write in .*\(Permission denied\); "
                                               r"choose another place$"):
        cli.check_writable_dir(tmp_path / "new" / "traces", "--out")
    assert not (tmp_path / "new").exists()


def test_the_other_samplers_options_are_refused_even_at_zero():
    from ddpm import cli
    with pytest.raises(config.UserError, match="--eta is an option of the DDIM sampler, not of DDPM"):
        cli.check_sampler_options("ddpm", eta=0.0)
    with pytest.raises(config.UserError, match="--steps and --eta are options of the DDIM sampler"):
        cli.check_sampler_options("ddpm", steps=0, eta=0.0)
    cli.check_sampler_options("ddim", steps=0, eta=0.0, variance=None)


def test_ci_runs_the_readmes_whole_test_command():
    """CI must run every test: `make test` as the README gives it, with no selection."""
    commands = [line.strip() for line in (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-1] == "make test"
    assert "make test" in (Path(__file__).resolve().parents[1] / "README.md").read_text()
