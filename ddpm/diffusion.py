"""The noise schedule, the forward process, the loss and the reverse-process samplers.

No model state lives here: a Diffusion holds the schedule (computed in float64, stored in float32)
and takes the model as an argument. Both samplers reduce to one update rule per step,

    x0 = x0_from_xt * x_t - x0_from_eps * eps      (then clipped to [-1, 1] if asked)
    x_prev = mean_x0 * x0 + mean_xt * x_t + sigma * z

so DDPM and DDIM differ only in their coefficient tables (a SamplerPlan), and one loop runs both.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SamplerPlan:
    """Per-step coefficients of the reverse process, in the order the steps run (t descending)."""
    timesteps: torch.Tensor      # long [S]
    x0_from_xt: torch.Tensor     # 1 / sqrt(abar_t)
    x0_from_eps: torch.Tensor    # sqrt(1 - abar_t) / sqrt(abar_t)
    mean_x0: torch.Tensor
    mean_xt: torch.Tensor
    sigma: torch.Tensor          # 0 at the last step


def usual_ddim_steps(timesteps: int) -> int:
    """DDIM's usual 50 steps, or T when shorter: the training grid's, and the scores' by default."""
    return min(50, timesteps)


class Diffusion:
    def __init__(self, timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 device: torch.device | str = "cpu"):
        self.timesteps = timesteps
        betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, dim=0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        self.schedule64 = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            # Ho et al. eq. 7: q(x_{t-1} | x_t, x_0) = N(mean_x0 * x0 + mean_xt * x_t, posterior_variance)
            "posterior_variance": betas * (1.0 - abar_prev) / (1.0 - abar),
            "posterior_mean_x0": betas * abar_prev.sqrt() / (1.0 - abar),
            "posterior_mean_xt": alphas.sqrt() * (1.0 - abar_prev) / (1.0 - abar),
        }
        self.device = torch.device(device)
        self.sqrt_abar = abar.sqrt().float().to(self.device)
        self.sqrt_one_minus_abar = (1.0 - abar).sqrt().float().to(self.device)

    @classmethod
    def from_config(cls, cfg, device="cpu"):
        return cls(cfg.timesteps, cfg.beta_start, cfg.beta_end, device)

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        return self.sqrt_abar[t].view(-1, 1, 1, 1) * x0 + self.sqrt_one_minus_abar[t].view(-1, 1, 1, 1) * noise

    def draw(self, batch: int, shape, generator=None):
        """t uniform in [0, T) and unit Gaussian noise for `batch` images of `shape`."""
        t = torch.randint(0, self.timesteps, (batch,), device=self.device, generator=generator)
        return t, torch.randn((batch, *shape), device=self.device, generator=generator)

    def loss(self, model, x0, t, noise):
        """Ho et al.'s simple loss: MSE between the true and the predicted noise."""
        return F.mse_loss(model(self.q_sample(x0, t, noise), t).float(), noise.float())

    # ---- samplers ------------------------------------------------------------------------------
    def _plan(self, timesteps, abar_t, abar_prev, mean_x0, mean_xt, variance) -> SamplerPlan:
        sigma = variance.clamp(min=0).sqrt()
        sigma[-1] = 0.0  # no noise on the final step
        as32 = lambda v: v.float().to(self.device)  # noqa: E731
        return SamplerPlan(timesteps.to(self.device), as32(1 / abar_t.sqrt()), as32((1 - abar_t).sqrt() / abar_t.sqrt()),
                           as32(mean_x0), as32(mean_xt), as32(sigma))

    def ddpm_plan(self, variance: str = "beta") -> SamplerPlan:
        """Ancestral sampling over all T steps; sigma_t^2 = beta_t (the seed) or the posterior's beta tilde."""
        s = self.schedule64
        steps = torch.arange(self.timesteps - 1, -1, -1)
        var = s["betas"] if variance == "beta" else s["posterior_variance"]
        return self._plan(steps, s["alphas_cumprod"][steps], s["alphas_cumprod_prev"][steps],
                          s["posterior_mean_x0"][steps], s["posterior_mean_xt"][steps], var[steps])

    def ddim_plan(self, num_steps: int = 50, eta: float = 0.0) -> SamplerPlan:
        """DDIM (Song et al. eq. 12) on num_steps timesteps from T-1 to 0, evenly spaced to the
        nearest integer (gaps of 20 or 21 for 50 of 1000; never a timestep twice), with eps
        re-derived from the (clipped) x0 so that the step is linear in (x0, x_t): eta = 1 over all
        T steps is the ancestral step with beta tilde."""
        abar = self.schedule64["alphas_cumprod"]
        steps = torch.linspace(self.timesteps - 1, 0, num_steps, dtype=torch.float64).round().long()
        abar_t = abar[steps]
        abar_prev = torch.cat([abar[steps[1:]], torch.ones(1, dtype=torch.float64)])
        var = eta**2 * (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
        direction = (1 - abar_prev - var).clamp(min=0).sqrt()  # coefficient of eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)
        mean_xt = direction / (1 - abar_t).sqrt()
        mean_x0 = abar_prev.sqrt() - mean_xt * abar_t.sqrt()
        return self._plan(steps, abar_t, abar_prev, mean_x0, mean_xt, var)

    def plan(self, sample_cfg) -> SamplerPlan:
        if sample_cfg.sampler == "ddim":
            return self.ddim_plan(sample_cfg.steps, sample_cfg.eta)
        return self.ddpm_plan(sample_cfg.variance)

    @staticmethod
    def step(plan: SamplerPlan, i, x, eps, noise, clip_x0: bool = True):
        """x_{t-1} from x_t and the predicted noise; i (an int, or a 1-element device tensor: a gather) indexes the plan."""
        x0 = plan.x0_from_xt[i] * x - plan.x0_from_eps[i] * eps
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
        return plan.mean_x0[i] * x0 + plan.mean_xt[i] * x + plan.sigma[i] * noise

    @staticmethod
    def denoise(model, plan: SamplerPlan, i, x, noise, clip_x0: bool = True):
        """One reverse step: the model's noise prediction, then the update (in fp32)."""
        eps = model(x, plan.timesteps[i].expand(x.shape[0])).float()
        return Diffusion.step(plan, i, x, eps, noise, clip_x0)

    @torch.no_grad()
    def sample(self, model, shape, plan: SamplerPlan, clip_x0: bool = True, generator=None,
               keep_every: int = 0, step=None):
        """Run the reverse process from pure noise. Returns the final images and, if keep_every > 0,
        the intermediate x_t every keep_every steps plus the final one (for the denoising GIF).
        `step(i, x, noise)` replaces the eager step (ddpm.sample.FastStep: compiled, graph-captured)."""
        step = step or (lambda i, x, noise: self.denoise(model, plan, i, x, noise, clip_x0))
        x = torch.randn(shape, device=self.device, generator=generator)
        frames = [x] if keep_every else []
        n = len(plan.timesteps)
        for i in range(n):
            x = step(i, x, torch.randn(shape, device=self.device, generator=generator))
            if keep_every and ((i + 1) % keep_every == 0 or i == n - 1):
                frames.append(x.clone())  # kept on the device: a copy to the host would wait for the GPU
        # clones: a graph-captured step reuses its buffer
        return x.clone(), [frame.cpu() for frame in frames]
