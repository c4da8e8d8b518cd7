"""
Gaussian diffusion as DiT uses it, in one file: the linear DDPM schedule (Ho et al. 2020), learned-range
variances and the hybrid loss of Improved DDPM (Nichol & Dhariwal 2021), timestep respacing, and the DDPM,
DDIM (Song et al. 2021) and DPM-Solver++(2M) (Lu et al. 2022) samplers, and guided sampling: classifier-free
guidance and FineDiffusion's superclass guidance (Eq. 1). Numerically it matches the official DiT `diffusion/`
package, and diffusers' `DPMSolverMultistepScheduler` for DPM-Solver++.

The model is any callable `model(x, t, **model_kwargs) -> (N, 2C, H, W)`: eps in the first C channels,
the variance interpolation v in [-1, 1] in the other C. `sample(model, z, labels)` is how every script samples.
"""
import math

import numpy as np
import torch
from tqdm import tqdm

# -----------------------------------------------------------------------------------------------------------
# Noise schedule and timestep respacing

def linear_betas(num_timesteps=1000):
    """beta_1..beta_T linear from 1e-4 to 0.02 for T = 1000 (Ho et al. Sec. 4), float64 as the official code."""
    scale = 1000 / num_timesteps  # the official rule for other T
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def space_timesteps(num_timesteps, spacing):
    """
    Which of the original timesteps a respaced sampler keeps (sorted), as the official `space_timesteps`:
    "ddim50" -> the integer stride that gives exactly 50 steps from 0; "250" -> 250 evenly spread steps,
    first and last included; "10,20" -> the range cut into equal sections, 10 steps in the first, 20 in the next.
    """
    if spacing.startswith("ddim"):
        count = int(spacing[len("ddim"):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == count:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot take exactly {count} of {num_timesteps} steps with an integer stride")
    counts = [int(c) for c in spacing.split(",")]
    size, extra = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        length = size + (i < extra)  # the first `extra` sections are one step longer
        if not 1 <= count <= length:
            raise ValueError(f"cannot take {count} steps from a section of {length} (spacing {spacing!r})")
        stride = (length - 1) / (count - 1) if count > 1 else 1
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))  # accumulate, as the official code, so rounding agrees with it
            position += stride
        start += length
    return kept


# -----------------------------------------------------------------------------------------------------------
# Gaussians: KL divergence and the discretized decoder likelihood (Ho et al. Sec. 3.3)

def mean_flat(x):
    """Mean over every dimension but the batch: (N, ...) -> (N,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """Phi(x) by the tanh approximation of the GELU paper, as the official code (exactness is not the point)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """
    log p(x) of data in [-1, 1] quantized to 256 levels under N(mean, e^(2 log_scale)): the Gaussian's mass on
    x's bin of width 2/255, with the edge bins reaching to -inf / +inf (Ho et al. Eq. 13). Elementwise, nats.
    """
    centered, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1 / 255))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp(min=1e-12))
    log_bin = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_bin))


# -----------------------------------------------------------------------------------------------------------
# The diffusion process

class Diffusion:
    """
    A DDPM with betas (T,) over kept timesteps; timestep_map[i] is the original timestep of step i, which is what
    the model sees. Schedule arrays stay float64 and are read per timestep as float32, as the official code.
    """
    def __init__(self, betas, timestep_map):
        self.betas = betas  # (T,) float64
        self.num_timesteps = len(betas)
        self.timestep_map = torch.as_tensor(timestep_map, dtype=torch.long)  # (T,)
        alphas = 1 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)  # alpha_bar_t
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])  # alpha_bar_{t-1}
        # the posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta~_t)  (Ho et al. Eq. 6-7)
        one_minus = 1 - self.alphas_cumprod
        self.posterior_variance = betas * (1 - self.alphas_cumprod_prev) / one_minus  # beta~_t
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / one_minus
        self.posterior_mean_coef2 = (1 - self.alphas_cumprod_prev) * alphas.sqrt() / one_minus
        # beta~_0 = 0, so its log is clipped to beta~_1's, as the official code
        self.posterior_log_variance_clipped = torch.log(torch.cat([self.posterior_variance[1:2],
                                                                   self.posterior_variance[1:]]))

    @staticmethod
    def at(values, t):
        """values (T,) float64 read at timesteps t (N,) -> (N, 1, 1, 1) float32, broadcastable over images."""
        return values.to(t.device)[t].float().view(-1, 1, 1, 1)

    def q_sample(self, x_start, t, noise):
        """x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)  (Ho et al. Eq. 4)."""
        ac = self.alphas_cumprod
        return self.at(ac.sqrt(), t) * x_start + self.at((1 - ac).sqrt(), t) * noise

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)  (Ho et al. Eq. 7)."""
        mean = self.at(self.posterior_mean_coef1, t) * x_start + self.at(self.posterior_mean_coef2, t) * x_t
        return mean, self.at(self.posterior_variance, t), self.at(self.posterior_log_variance_clipped, t)

    def p_mean_variance(self, model, x, t, model_kwargs=None):
        """p(x_{t-1} | x_t) from one model call; t (N,) are step indices, the model sees timestep_map[t]."""
        model_output = model(x, self.timestep_map.to(t.device)[t], **(model_kwargs or {}))
        return self.p_from_output(model_output, x, t)

    def p_from_output(self, model_output, x, t):
        """model_output (N, 2C, H, W) -> dict of mean, variance, log_variance, pred_xstart, each (N, C, H, W)."""
        eps, v = model_output.split(x.shape[1], dim=1)
        # learned range: log Sigma = frac log beta_t + (1 - frac) log beta~_t, frac = (v + 1) / 2 (Improved DDPM Eq. 15)
        min_log = self.at(self.posterior_log_variance_clipped, t)
        max_log = self.at(self.betas.log(), t)
        frac = (v + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        # x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)  (Ho et al. Eq. 4 solved for x_0)
        ac = self.alphas_cumprod
        pred_xstart = self.at((1 / ac).sqrt(), t) * x - self.at((1 / ac - 1).sqrt(), t) * eps
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)  # mu~(x_t, x_0^) (Ho et al. Eq. 7)
        return dict(mean=mean, variance=torch.exp(log_variance), log_variance=log_variance, pred_xstart=pred_xstart)

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """
        The hybrid loss L_simple + L_vlb of Improved DDPM (Eq. 16), per sample: `mse` is the eps MSE (Ho et al.
        Eq. 14); `vb` is L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0 and the decoder NLL
        L_0 = -log p(x_0|x_1) at t = 0, in bits per dimension. `vb` is one sampled term, L_vlb / T, which with T = 1000
        is the paper's lambda = 0.001. It sees the mean detached, so it trains only the variance (Sec. 3.1).
        """
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        model_output = model(x_t, self.timestep_map.to(t.device)[t], **(model_kwargs or {}))  # (N, 2C, H, W)
        eps, v = model_output.split(x_start.shape[1], dim=1)
        p = self.p_from_output(torch.cat([eps.detach(), v], dim=1), x_t, t)
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x_start, p["mean"], 0.5 * p["log_variance"]))
        vb = torch.where(t == 0, nll / math.log(2.0), kl)
        mse = mean_flat((noise - eps) ** 2)
        return dict(loss=mse + vb, mse=mse, vb=vb)


def create_diffusion(timestep_respacing="", num_timesteps=1000):
    """
    DiT's diffusion: linear betas over 1000 steps, eps prediction, learned-range sigma, MSE + VLB. A respacing
    ("250", "10,20", "ddim50"; "" keeps all) keeps some timesteps and recomputes betas from their alpha_bar so the
    kept chain has the same marginals: beta'_i = 1 - alpha_bar_{k_i} / alpha_bar_{k_(i-1)}  (Improved DDPM Sec. 4).
    """
    kept = space_timesteps(num_timesteps, timestep_respacing or str(num_timesteps))
    alphas_cumprod = torch.cumprod(1 - linear_betas(num_timesteps), dim=0)[kept]
    betas = 1 - alphas_cumprod / torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    return Diffusion(betas, kept)


# -----------------------------------------------------------------------------------------------------------
# Samplers: sampler(model, x_T, diffusion, model_kwargs, progress) -> x_0, one model call per kept step

@torch.no_grad()
def sample_ddpm(model, x, diffusion, model_kwargs=None, progress=True):
    """
    Ancestral sampling, Ho et al. 2020 Alg. 2, with the learned variance of Improved DDPM:
    x_{t-1} = mu(x_t, t) + sigma_t z, z ~ N(0, I), z = 0 at the last step. One randn_like per step, the last
    included, so a seed gives the official code's samples.
    """
    for i in tqdm(range(diffusion.num_timesteps - 1, -1, -1), disable=not progress):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        p = diffusion.p_mean_variance(model, x, t, model_kwargs)
        noise = torch.randn_like(x)
        x = p["mean"] + (i > 0) * torch.exp(0.5 * p["log_variance"]) * noise  # Alg. 2 line 4
    return x


@torch.no_grad()
def sample_ddim(model, x, diffusion, model_kwargs=None, progress=True, eta=0.0):
    """
    DDIM, Song et al. 2021 Eq. 12: x_{t-1} = sqrt(alpha_bar_{t-1}) x_0^ + sqrt(1 - alpha_bar_{t-1} - sigma_t^2) eps
    + sigma_t z, where sigma_t = eta sqrt((1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) (1 - alpha_bar_t / alpha_bar_{t-1}))
    (Eq. 16). eta = 0 is deterministic, eta = 1 is DDPM with the posterior variance. Run it on a "ddimN" respacing.
    """
    for i in tqdm(range(diffusion.num_timesteps - 1, -1, -1), disable=not progress):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        p = diffusion.p_mean_variance(model, x, t, model_kwargs)
        ac = diffusion.alphas_cumprod
        # eps consistent with x_0^: Ho et al. Eq. 4 solved for eps
        eps = (diffusion.at((1 / ac).sqrt(), t) * x - p["pred_xstart"]) / diffusion.at((1 / ac - 1).sqrt(), t)
        alpha_bar, alpha_bar_prev = diffusion.at(ac, t), diffusion.at(diffusion.alphas_cumprod_prev, t)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        noise = torch.randn_like(x)  # drawn at every step, as the official code, so a seed gives its samples
        mean = p["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
        x = mean + sigma * noise  # sigma is exactly 0 at the last step, where alpha_bar_prev = 1
    return x


@torch.no_grad()
def sample_dpm_solver(model, x, diffusion, model_kwargs=None, progress=True, steps=20):
    """
    DPM-Solver++(2M), Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
    Models", Alg. 2: the diffusion ODE solved in lambda = log(alpha_t / sigma_t) with the data prediction
    x_theta = (x_t - sigma_t eps) / alpha_t, multistep second order, first order at the first and last step.
    Pass the full chain (`create_diffusion("")`); the model sees timesteps round(k (T - 1) / steps) for
    k = steps..1 (diffusers' "linspace" spacing: 999, 949, ..., 50 for 20 steps), and the last step goes to
    sigma = 0, i.e. returns x_theta itself. With alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t) this
    is diffusers' `DPMSolverMultistepScheduler` with algorithm_type "dpmsolver++", solver_order 2, midpoint,
    lower_order_final and final_sigmas_type "zero".
    """
    n = diffusion.num_timesteps
    # numpy's own linspace and round-half-to-even, so ties (e.g. 499.5) round as diffusers does
    index = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].astype(np.int64).tolist()
    alpha_bar = diffusion.alphas_cumprod[index].tolist() + [1.0]  # alpha_bar = 1 (sigma = 0) after the last step
    alpha = [math.sqrt(a) for a in alpha_bar]
    sigma = [math.sqrt(1 - a) for a in alpha_bar]
    lam = [math.log(a / s) if s > 0 else math.inf for a, s in zip(alpha, sigma)]
    x0_prev = None
    for i in tqdm(range(steps), disable=not progress):
        t = torch.full((x.shape[0],), int(diffusion.timestep_map[index[i]]), device=x.device, dtype=torch.long)
        eps = model(x, t, **(model_kwargs or {}))[:, : x.shape[1]]  # the variance channels are not used
        x0 = (x - sigma[i] * eps) / alpha[i]  # data prediction x_theta(x_t, t)
        h = lam[i + 1] - lam[i]
        if x0_prev is None or i == steps - 1:
            # first step: no history yet; last step: h = inf, so the 2nd-order correction (1 / r) is undefined
            d = x0
        else:
            r = (lam[i] - lam[i - 1]) / h  # DPM-Solver++ Alg. 2: r_i = h_{i-1} / h_i
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev  # DPM-Solver++ Alg. 2: D_i, x_theta extrapolated
        # DPM-Solver++ Alg. 2 update, exact for the linear part of the ODE; with D_i = x_theta it is DDIM
        x = (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * math.expm1(-h) * d
        x0_prev = x0
    return x


# -----------------------------------------------------------------------------------------------------------
# The samplers by name, as the command lines offer them, with their usual step counts

SAMPLER_STEPS = {"ddpm": 250, "ddim": 50, "dpm++": 20}  # DiT's and FineDiffusion's 250; the usual 50 and 20
STEP_RANGES = {"ddpm": (2, 1000), "ddim": (2, 1000), "dpm++": (1, 999)}  # what each can do on 1000 steps


def check_steps(name, steps):
    """A ValueError that says the valid range, unless sampler `name` can take `steps` model calls."""
    low, high = STEP_RANGES[name]
    if not low <= steps <= high:
        raise ValueError(f"{name} takes {low} to {high} steps, not {steps}")
    if name == "ddim":
        space_timesteps(1000, f"ddim{steps}")  # the counts no integer stride gives raise


def run_sampler(name, model, x, steps=None, model_kwargs=None, progress=True):
    """x_T -> x_0 by sampler `name` in `steps` model calls (default SAMPLER_STEPS[name]): DDPM on `steps` evenly
    respaced timesteps, DDIM on the "ddim{steps}" stride, DPM-Solver++ on the full chain at diffusers' timesteps."""
    steps = steps or SAMPLER_STEPS[name]
    if name == "dpm++":
        return sample_dpm_solver(model, x, create_diffusion(""), model_kwargs, progress, steps=steps)
    sampler, spacing = (sample_ddim, f"ddim{steps}") if name == "ddim" else (sample_ddpm, str(steps))
    return sampler(model, x, create_diffusion(spacing), model_kwargs, progress)


# -----------------------------------------------------------------------------------------------------------
# Guided sampling: classifier-free guidance (Ho & Salimans 2022) and its fine-grained form, FineDiffusion Eq. 1

def guided(model, labels, parents, scale=4.0, guided_channels=None):
    """`model(x, t, y)` guided towards `labels` (N,) and away from the label rows `parents` (N,), as the callable a
    sampler runs on the doubled batch [z, z] (labels [c, parent]); both halves get Eq. 1's eps on every eps channel,
    or on the first `guided_channels` only (3: the official DiT code's quirk), and keep their own variance channels.
    Doubling the batch as the official samplers do makes a seed draw the same per-step noise as theirs."""
    y = torch.cat([labels, parents])

    def model_fn(x, t):
        half = x[: len(x) // 2]
        out = model(torch.cat([half, half]), t, y)  # (2N, 2C, H, W)
        k = guided_channels or x.shape[1]
        eps, rest = out.split([k, out.shape[1] - k], dim=1)
        cond_eps, parent_eps = eps.chunk(2)
        eps = parent_eps + scale * (cond_eps - parent_eps)  # FineDiffusion Eq. 1 (w = scale)
        return torch.cat([torch.cat([eps, eps]), rest], dim=1)

    return model_fn


def default_guidance(model):
    """A DiT's own guidance: "fine" (Eq. 1) where its label table has superclass rows, else "cfg" (the null row)."""
    return "fine" if model.y_embedder.num_superclasses else "cfg"


def sample(model, z, labels, guidance=None, scale=4.0, sampler="ddpm", steps=None, guided_channels=None, progress=True):
    """Noise z (N, C, H, W) -> x_0 (N, C, H, W) of the classes `labels` (N,) by `sampler` (run_sampler), guided:
    "fine" away from each class's superclass row (FineDiffusion Eq. 1), "cfg" away from the null row (classifier-free
    guidance), "none" not at all; None: default_guidance(model). The rows come from the DiT's label table."""
    guidance = guidance or default_guidance(model)
    if guidance == "none":
        return run_sampler(sampler, lambda x, t: model(x, t, labels), z, steps, progress=progress)
    model_fn = guided(model, labels, model.y_embedder.parent_rows(labels, guidance), scale, guided_channels)
    return run_sampler(sampler, model_fn, torch.cat([z, z]), steps, progress=progress)[: len(z)]
