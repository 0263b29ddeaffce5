import math

import pytest
import torch

from ddpm import config, model
from ddpm.diffusion import Diffusion

T = 1000


def test_schedule_closed_forms():
    d = Diffusion(T, 1e-4, 0.02)
    s = d.schedule64
    assert s["betas"].dtype == torch.float64
    torch.testing.assert_close(s["betas"][[0, -1]], torch.tensor([1e-4, 0.02], dtype=torch.float64))
    t = torch.arange(T, dtype=torch.float64)
    # float64 throughout: betas computed in float32 and cast are ~1e-9 off, abar ~1e-8
    torch.testing.assert_close(s["betas"], 1e-4 + t * (0.02 - 1e-4) / (T - 1), rtol=1e-12, atol=0)
    # abar_t = prod_{s<=t} (1 - beta_s), via logs, from the betas written out above
    expected_betas = 1e-4 + t * (0.02 - 1e-4) / (T - 1)
    torch.testing.assert_close(s["alphas_cumprod"], torch.exp(torch.cumsum(torch.log1p(-expected_betas), 0)),
                               rtol=1e-12, atol=0)
    assert d.sqrt_abar.dtype == torch.float32
    torch.testing.assert_close(d.sqrt_abar.double() ** 2, s["alphas_cumprod"], atol=1e-6, rtol=1e-5)
    assert 0 < s["alphas_cumprod"][-1] < 1e-4  # nearly pure noise at T


def test_q_sample_statistics():
    d = Diffusion(T)
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1, 1, 1), 0.5)
    for step in (0, 250, 999):
        t = torch.full((x0.shape[0],), step)
        xt = d.q_sample(x0, t, torch.randn(x0.shape, generator=g))
        abar = d.schedule64["alphas_cumprod"][step].item()
        assert abs(xt.mean().item() - abar**0.5 * 0.5) < 0.01
        assert abs(xt.var().item() - (1 - abar)) < 0.01 * max(1 - abar, 1e-2) + 1e-4


def test_q_sample_is_ho_et_al_eq_4_and_the_samplers_invert_it():
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with the given eps (its statistics alone do not see
    the sign of the noise term), and every plan's x0 from (x_t, eps) gives x0 back."""
    d = Diffusion(T)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(3, 1, 4, 4, generator=g) * 2 - 1, torch.randn(3, 1, 4, 4, generator=g)
    t = torch.tensor([0, 400, 999])
    abar = d.schedule64["alphas_cumprod"][t].view(-1, 1, 1, 1)
    xt = d.q_sample(x0, t, noise)
    torch.testing.assert_close(xt.double(), abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double(),
                               rtol=1e-6, atol=1e-6)
    for plan in (d.ddpm_plan("beta"), d.ddim_plan(T)):  # DDIM with every step: its i is T - 1 - t
        i = [int((plan.timesteps == step).nonzero()) for step in t]
        x0_back = plan.x0_from_xt[i].view(-1, 1, 1, 1) * xt - plan.x0_from_eps[i].view(-1, 1, 1, 1) * noise
        torch.testing.assert_close(x0_back, x0, rtol=0, atol=2e-3)


def test_posterior_matches_ho_et_al_eq_6_7():
    """The posterior from Bayes' rule on the two Gaussians q(x_t | x_{t-1}) and q(x_{t-1} | x_0)."""
    s = Diffusion(T).schedule64
    beta, alpha = s["betas"][1:], s["alphas"][1:]
    abar_prev = s["alphas_cumprod"][:-1]
    precision = 1 / (1 - abar_prev) + alpha / beta
    torch.testing.assert_close(s["posterior_variance"][1:], 1 / precision)
    torch.testing.assert_close(s["posterior_mean_x0"][1:], abar_prev.sqrt() / (1 - abar_prev) / precision)
    torch.testing.assert_close(s["posterior_mean_xt"][1:], alpha.sqrt() / beta / precision)
    assert s["posterior_variance"][0] == 0  # t = 0 has no noise


def test_ddim_eta1_all_steps_is_the_ancestral_step_with_beta_tilde():
    d = Diffusion(T)
    ddpm, ddim = d.ddpm_plan("posterior"), d.ddim_plan(T, eta=1.0)
    for field in ("timesteps", "x0_from_xt", "x0_from_eps", "mean_x0", "mean_xt", "sigma"):
        torch.testing.assert_close(getattr(ddim, field), getattr(ddpm, field), rtol=1e-5, atol=1e-7, msg=field)


def test_ddim_sigma_is_song_et_al_eq_16_for_any_eta():
    """sigma_t(eta) = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev), and the
    step is eq. 12: sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z."""
    d = Diffusion(T)
    abar = d.schedule64["alphas_cumprod"]
    g = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    for eta in (0.3, 0.5, 2.0):
        plan = d.ddim_plan(20, eta)
        for i in (0, 7, 18):
            t, t_prev = plan.timesteps[i], plan.timesteps[i + 1]
            a, a_prev = abar[t], abar[t_prev]
            sigma = eta * ((1 - a_prev) / (1 - a)).sqrt() * (1 - a / a_prev).sqrt()
            assert abs(plan.sigma[i].item() - sigma.item()) < 1e-6 * max(sigma.item(), 1.0), (eta, i)
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            direction = (1 - a_prev - sigma**2).clamp(min=0).sqrt()
            expected = a_prev.sqrt() * x0 + direction * eps + sigma * z
            out = Diffusion.step(plan, i, x.float(), eps.float(), z.float(), clip_x0=False)
            torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)


def test_draw_covers_every_timestep_uniformly():
    d = Diffusion(10)
    t, noise = d.draw(100_000, (1, 2, 2), torch.Generator().manual_seed(0))
    counts = torch.bincount(t, minlength=10)
    assert len(counts) == 10 and counts.min() > 9_500 and counts.max() < 10_500, counts
    assert noise.shape == (100_000, 1, 2, 2) and abs(noise.std().item() - 1) < 0.01
    # Gaussian, not merely of unit variance: mean 0, kurtosis 3 (uniform noise has 1.8), and the
    # share within one sigma (68.3%)
    z = noise.double().flatten()
    assert abs(z.mean().item()) < 0.005
    assert abs((z ** 4).mean().item() / (z ** 2).mean().item() ** 2 - 3) < 0.05
    assert abs((z.abs() < 1).double().mean().item() - 0.6827) < 0.003


def test_loss_is_the_mean_squared_error_of_the_predicted_noise():
    d = Diffusion(T)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    predict = lambda x_t, t: 0.5 * x_t  # noqa: E731
    expected = ((0.5 * d.q_sample(x0, t, noise) - noise) ** 2).mean()
    torch.testing.assert_close(d.loss(predict, x0, t, noise), expected)


def test_ddpm_step_without_clipping_is_the_seeds_mean():
    """mu = (x_t - beta_t / sqrt(1 - abar_t) * eps) / sqrt(alpha_t), sigma^2 = beta_t."""
    d = Diffusion(T)
    plan = d.ddpm_plan("beta")
    s = d.schedule64
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    for i in (0, 500, 998):
        t = plan.timesteps[i].item()
        seed_mean = (x.double() - s["betas"][t] / (1 - s["alphas_cumprod"][t]).sqrt() * eps.double()) / s["alphas"][t].sqrt()
        out = Diffusion.step(plan, i, x, eps, torch.zeros_like(x), clip_x0=False)
        torch.testing.assert_close(out.double(), seed_mean, atol=2e-4, rtol=1e-4)
        assert abs(plan.sigma[i].item() ** 2 - s["betas"][t].item()) < 1e-8
    assert plan.sigma[-1] == 0 and plan.timesteps[-1] == 0


def test_clipping_bounds_the_predicted_x0():
    d = Diffusion(T)
    plan = d.ddim_plan(10, 0.0)
    x = torch.full((1, 1, 2, 2), 50.0)
    eps = torch.zeros_like(x)
    clipped = Diffusion.step(plan, 9, x, eps, eps, clip_x0=True)  # last step: x_prev = x0
    torch.testing.assert_close(clipped, torch.ones_like(x), rtol=0, atol=1e-6)  # x0 clipped to exactly 1
    torch.testing.assert_close(Diffusion.step(plan, 9, -x, eps, eps, clip_x0=True), -torch.ones_like(x), rtol=0, atol=1e-6)
    assert Diffusion.step(plan, 9, x, eps, eps, clip_x0=False).abs().max() > 1.0
    inside = torch.tensor([-0.999, -0.5, 0.5, 0.999]).view(1, 1, 2, 2)  # an x0 in [-1, 1] is left as it is
    x_t = inside / plan.x0_from_xt[9]
    torch.testing.assert_close(Diffusion.step(plan, 9, x_t, eps, eps, clip_x0=True),
                               Diffusion.step(plan, 9, x_t, eps, eps, clip_x0=False), rtol=0, atol=0)


def test_ddim_eta0_is_deterministic_and_ddpm_is_not():
    torch.manual_seed(0)
    cfg = config.load("configs/ci.yaml")
    net = model.build(cfg).eval()
    d = Diffusion.from_config(cfg.diffusion)
    plan = d.ddim_plan(10, 0.0)
    assert (plan.sigma == 0).all()
    x_t = torch.randn(2, 1, 32, 32)

    def run(plan, noise_seed):
        g = torch.Generator().manual_seed(noise_seed)
        x = x_t.clone()
        with torch.no_grad():
            for i in range(len(plan.timesteps)):
                eps = net(x, plan.timesteps[i].expand(2))
                x = Diffusion.step(plan, i, x, eps, torch.randn(x.shape, generator=g))
        return x

    torch.testing.assert_close(run(plan, 1), run(plan, 2), rtol=0, atol=0)
    ddpm = d.ddpm_plan()
    assert not torch.equal(run(ddpm, 1), run(ddpm, 2))


def test_sample_returns_frames_ending_at_the_result():
    cfg = config.load("configs/ci.yaml")
    net = model.build(cfg).eval()
    d = Diffusion.from_config(cfg.diffusion)
    plan = d.ddim_plan(10)
    after = []  # x after each step

    def step(i, x, noise):
        after.append(d.denoise(net, plan, i, x, noise))
        return after[-1]
    x, frames = d.sample(net, (2, 1, 32, 32), plan, generator=torch.Generator().manual_seed(0), keep_every=4, step=step)
    # the starting noise, then x after steps 4 and 8 and after the last
    assert len(frames) == 1 + 3 and torch.equal(frames[0], torch.randn((2, 1, 32, 32), generator=torch.Generator().manual_seed(0)))
    assert all(torch.equal(frame, after[k]) for frame, k in zip(frames[1:], (3, 7, 9)))
    assert torch.equal(frames[-1], x) and x.abs().max() <= 1.0 + 1e-6


def test_small_model_overfits_eight_images():
    """The loss on a fixed set of (t, noise) draws over eight real digits falls more than 5x."""
    from ddpm import data
    torch.manual_seed(0)
    cfg = config.load("configs/ci.yaml", ["model.base_channels=16"])
    net = model.build(cfg)
    d = Diffusion.from_config(cfg.diffusion)
    images = data.to_model_input(data.load_offline_subset().images[::625])
    g = torch.Generator().manual_seed(0)
    t_eval = torch.randint(0, d.timesteps, (4, 8), generator=g)
    noise_eval = torch.randn(4, *images.shape, generator=g)

    def eval_loss():
        with torch.no_grad():
            return sum(torch.nn.functional.mse_loss(net(d.q_sample(images, t, n), t), n).item()
                       for t, n in zip(t_eval, noise_eval)) / len(t_eval)

    before = eval_loss()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(300):
        loss = d.loss(net, images, *d.draw(8, images.shape[1:], g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < before / 5, (before, after)


def test_sample_asks_the_model_at_the_plans_timesteps_and_steps_from_pure_noise():
    """The loop: x_T ~ N(0, I), then for each planned t (descending) eps = model(x_t, t) and one
    update with fresh noise; checked against the update written out by hand with the same draws."""
    d = Diffusion(T)
    plan = d.ddim_plan(5, eta=0.5)
    calls = []

    def model(x, t):
        calls.append((x.clone(), t.clone()))
        return 0.1 * x + t.float().view(-1, 1, 1, 1) / T

    out, _ = d.sample(model, (3, 1, 4, 4), plan, clip_x0=True, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 1, 4, 4, generator=g)
    for i, (seen_x, seen_t) in enumerate(calls):
        assert torch.equal(seen_t, plan.timesteps[i].expand(3)) and torch.equal(seen_x, x)
        eps = 0.1 * x + plan.timesteps[i] / T
        x0 = (plan.x0_from_xt[i] * x - plan.x0_from_eps[i] * eps).clamp(-1, 1)
        x = plan.mean_x0[i] * x0 + plan.mean_xt[i] * x + plan.sigma[i] * torch.randn(3, 1, 4, 4, generator=g)
    assert len(calls) == 5 and plan.timesteps.tolist() == [999, 749, 500, 250, 0]
    torch.testing.assert_close(out, x)


def test_a_config_names_its_samplers_plan():
    """sample.eta and sample.variance reach the plan: DDIM at eta 0.5 adds noise, DDPM with the
    posterior variance takes beta-tilde."""
    d = Diffusion(T)

    def fields(plan):
        return [getattr(plan, f) for f in plan.__dataclass_fields__]

    def plan_of(*overrides):
        return d.plan(config.load(None, list(overrides)).sample)
    for got, want in ((plan_of("sample.sampler=ddim", "sample.steps=20", "sample.eta=0.5"), d.ddim_plan(20, 0.5)),
                      (plan_of("sample.sampler=ddim", "sample.steps=20"), d.ddim_plan(20, 0.0)),
                      (plan_of("sample.sampler=ddpm", "sample.variance=posterior"), d.ddpm_plan("posterior")),
                      (plan_of("sample.sampler=ddpm"), d.ddpm_plan("beta"))):
        assert all(torch.equal(a, b) for a, b in zip(fields(got), fields(want)))
    assert (plan_of("sample.sampler=ddim", "sample.steps=20", "sample.eta=0.5").sigma[:-1] > 0).all()
    assert not torch.equal(d.ddpm_plan("posterior").sigma, d.ddpm_plan("beta").sigma)


@pytest.mark.parametrize("sampler, eta, steps", [("ddpm", None, "beta"), ("ddpm", None, "posterior"),
                                                 ("ddim", 0.0, 1000), ("ddim", 0.0, 10), ("ddim", 1.0, 50)])
def test_the_samplers_with_the_exact_noise_predictor_reach_gaussian_data(sampler, eta, steps):
    """Whole chains, not single steps: for data x0 ~ N(m, s^2) the ideal model is known in closed form,
    E[eps | x_t] = sqrt(1 - abar)(x_t - sqrt(abar) m) / (abar s^2 + 1 - abar). DDPM (either variance)
    and DDIM over all 1000 steps must return the data's mean and spread; short DDIM chains shrink
    the spread (0.098 for 10 steps), exactly as Song et al.'s update (eq. 12 with sigma of eq. 16),
    applied here to the mean and variance in float64, says."""
    d, (m, s) = Diffusion(), (0.3, 0.2)
    abar = d.schedule64["alphas_cumprod"]

    def ideal(x, t):
        a = abar[t].view(-1, 1, 1, 1).float()
        return (1 - a).sqrt() * (x - a.sqrt() * m) / (a * s * s + 1 - a)

    plan = d.ddpm_plan(steps) if sampler == "ddpm" else d.ddim_plan(steps, eta)
    x, _ = d.sample(ideal, (5000, 1, 2, 2), plan, clip_x0=sampler == "ddpm",
                    generator=torch.Generator().manual_seed(0))
    mean, std = (m, s)
    if sampler == "ddim":  # the chain's own Gaussian: each step is affine in x_t, plus noise
        mean, var, ts = 0.0, 1.0, [round(999 - i * 999 / (steps - 1)) for i in range(steps)]
        for t, t_prev in zip(ts, ts[1:] + [None]):
            a, a_prev = abar[t].item(), 1.0 if t_prev is None else abar[t_prev].item()
            sigma2 = eta ** 2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
            k = math.sqrt(1 - a) / (a * s * s + 1 - a)  # eps = k (x_t - sqrt(a) m)
            x0_gain, x0_shift = (1 - math.sqrt(1 - a) * k) / math.sqrt(a), math.sqrt(1 - a) * k * m
            eps_gain, eps_shift = k, -k * math.sqrt(a) * m
            direction = math.sqrt(1 - a_prev - sigma2)
            gain = math.sqrt(a_prev) * x0_gain + direction * eps_gain
            shift = math.sqrt(a_prev) * x0_shift + direction * eps_shift
            mean, var = gain * mean + shift, gain ** 2 * var + sigma2
        std = math.sqrt(var)
        if steps == 1000:
            assert abs(mean - m) < 0.002 and abs(std / s - 1) < 0.02  # the ODE's fine limit is the data
        if steps == 10:
            assert std < 0.5 * s
    assert abs(x.mean().item() - mean) < 0.006, (x.mean().item(), mean)  # 20,000 values: 4 standard errors
    assert abs(x.std().item() / std - 1) < (0.03 if sampler == "ddpm" else 0.02), (x.std().item(), std)
