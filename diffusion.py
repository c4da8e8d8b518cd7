"""
Gaussian diffusion as DiT uses it (Ho et al. 2020; Improved DDPM, Nichol & Dhariwal 2021): schedule,
hybrid loss, respacing, DDPM, DDIM and DPM-Solver++ and guided sampling (FineDiffusion Eq. 1), as
the official DiT code and diffusers. The model: `model(x, t, **kwargs) -> (N, 2C, H, W)`, eps and v.
"""
import itertools
import math

import numpy as np
import torch
from tqdm import tqdm

# --------------------------------------------------------------------------------------------------
# Timestep respacing

def space_timesteps(num_timesteps, spacing):
    """The timesteps a respacing keeps, as the official code: "ddim50": the integer stride giving
    50 steps from 0; "250": 250 evenly, ends included; "10,20": 10 in one half, 20 in the other."""
    if spacing.startswith("ddim"):
        count = int(spacing[len("ddim"):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == count:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot take {count} of {num_timesteps} steps with an integer stride")
    counts = [int(c) for c in spacing.split(",")]
    size, extra = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        length = size + (i < extra)  # the first `extra` sections are one step longer
        if not 1 <= count <= length:
            raise ValueError(f"cannot take {count} steps from a section of {length} ({spacing!r})")
        stride = (length - 1) / (count - 1) if count > 1 else 1
        positions = itertools.accumulate([0.0] + [stride] * (count - 1))  # rounds as the official
        kept += [start + round(position) for position in positions]
        start += length
    return kept


# --------------------------------------------------------------------------------------------------
# Gaussians: KL divergence and the discretized decoder likelihood (Ho et al. Sec. 3.3)

def mean_flat(x):
    """Mean over every dimension but the batch: (N, ...) -> (N,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log p(x) of data in [-1, 1] in 256 levels under N(mean, e^(2 log_scale)): the mass on x's bin
    of width 2/255, the edge bins reaching to -inf / +inf (Ho et al. Eq. 13). Elementwise, nats."""
    # Phi by the GELU paper's tanh approximation, as the official code
    cdf = lambda v: 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))
    centered, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus, cdf_min = cdf(inv_std * (centered + 1 / 255)), cdf(inv_std * (centered - 1 / 255))
    log = lambda p: torch.log(p.clamp(min=1e-12))
    log_top_bin = torch.where(x > 0.999, log(1 - cdf_min), log(cdf_plus - cdf_min))
    return torch.where(x < -0.999, log(cdf_plus), log_top_bin)


# --------------------------------------------------------------------------------------------------
# The diffusion process

class Diffusion:
    """A DDPM with betas (T,) over kept timesteps; the model sees timestep_map[i] at step i.
    Schedule arrays stay float64 and are read per timestep as float32, as the official code."""
    def __init__(self, betas, timestep_map):
        self.betas, self.num_timesteps = betas, len(betas)  # (T,) float64
        self.timestep_map = torch.as_tensor(timestep_map, dtype=torch.long)  # (T,)
        alphas = 1 - betas
        self.alphas_cumprod = ac = torch.cumprod(alphas, dim=0)  # alpha_bar_t
        self.alphas_cumprod_prev = ac_prev = torch.cat([betas.new_ones(1), ac[:-1]])
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta~_t)  (Ho et al. Eq. 6-7)
        self.posterior_variance = var = betas * (1 - ac_prev) / (1 - ac)  # beta~_t
        self.posterior_mean_coef1 = betas * ac_prev.sqrt() / (1 - ac)
        self.posterior_mean_coef2 = (1 - ac_prev) * alphas.sqrt() / (1 - ac)
        # beta~_0 = 0, so its log is clipped to beta~_1's, as the official code
        self.posterior_log_variance_clipped = torch.log(torch.cat([var[1:2], var[1:]]))

    @staticmethod
    def at(values, t):
        """values (T,) float64 read at timesteps t (N,) -> (N, 1, 1, 1) float32."""
        return values.to(t.device)[t].float().view(-1, 1, 1, 1)

    def q_sample(self, x_start, t, noise):
        """x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)  (Ho et al. Eq. 4)."""
        ac = self.alphas_cumprod
        return self.at(ac.sqrt(), t) * x_start + self.at((1 - ac).sqrt(), t) * noise

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)  (Ho et al. Eq. 7)."""
        at = self.at
        mean = at(self.posterior_mean_coef1, t) * x_start + at(self.posterior_mean_coef2, t) * x_t
        return mean, at(self.posterior_variance, t), at(self.posterior_log_variance_clipped, t)

    def p_mean_variance(self, model, x, t, model_kwargs=None):
        """p(x_{t-1} | x_t) from one model call at step indices t (N,)."""
        model_output = model(x, self.timestep_map.to(t.device)[t], **(model_kwargs or {}))
        return self.p_from_output(model_output, x, t)

    def p_from_output(self, model_output, x, t):
        """(N, 2C, H, W) -> dict of mean, variance, log_variance, pred_xstart, each (N, C, H, W)."""
        eps, v = model_output.split(x.shape[1], dim=1)
        frac = (v + 1) / 2  # log Sigma = frac log beta_t + (1 - frac) log beta~_t, Improved Eq. 15
        log_variance = (frac * self.at(self.betas.log(), t)
                        + (1 - frac) * self.at(self.posterior_log_variance_clipped, t))
        # x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)  (Ho et al. Eq. 4)
        ac = self.alphas_cumprod
        pred_xstart = self.at((1 / ac).sqrt(), t) * x - self.at((1 / ac - 1).sqrt(), t) * eps
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)  # mu~(x_t, x_0^)  (Eq. 7)
        return dict(mean=mean, variance=torch.exp(log_variance), log_variance=log_variance,
                    pred_xstart=pred_xstart)

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Improved DDPM's hybrid loss (Eq. 16) per sample: `mse` of eps (Ho et al. Eq. 14) + `vb`,
        a term of L_vlb in bits/dim on the detached mean: it trains only the variance (Sec. 3.1)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        model_output = model(x_t, self.timestep_map.to(t.device)[t], **(model_kwargs or {}))
        eps, v = model_output.split(x_start.shape[1], dim=1)  # (N, C, H, W) each
        p = self.p_from_output(torch.cat([eps.detach(), v], dim=1), x_t, t)
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        # L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)); L_0 = -log p(x_0 | x_1)
        mean, log_variance = p["mean"], p["log_variance"]
        kl = mean_flat(normal_kl(true_mean, true_log_variance, mean, log_variance))
        nll = -mean_flat(discretized_gaussian_log_likelihood(x_start, mean, log_variance / 2))
        vb = torch.where(t == 0, nll, kl) / math.log(2.0)
        mse = mean_flat((noise - eps) ** 2)
        return dict(loss=mse + vb, mse=mse, vb=vb)


def create_diffusion(timestep_respacing=""):
    """DiT's diffusion; a respacing ("250", "10,20", "ddim50"; "": none) keeps the marginals at the
    kept k_i: beta'_i = 1 - alpha_bar_{k_i} / alpha_bar_{k_(i-1)}  (Improved DDPM Sec. 4)."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)  # T = 1000 (Ho et al. Sec. 4)
    kept = space_timesteps(1000, timestep_respacing or "1000")
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)[kept]
    betas = 1 - alphas_cumprod / torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    return Diffusion(betas, kept)


# --------------------------------------------------------------------------------------------------
# Samplers: sampler(model, x_T, diffusion, model_kwargs, progress) -> x_0, one model call a step

@torch.no_grad()
def sample_ddpm(model, x, diffusion, model_kwargs=None, progress=True):
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2) with Improved DDPM's learned variance. Noise
    is drawn at every step, the last included, so a seed gives the official code's samples."""
    for i in tqdm(range(diffusion.num_timesteps - 1, -1, -1), disable=not progress):
        t = x.new_full((len(x),), i, dtype=torch.long)
        p = diffusion.p_mean_variance(model, x, t, model_kwargs)
        x = p["mean"] + (i > 0) * torch.exp(0.5 * p["log_variance"]) * torch.randn_like(x)
    return x


@torch.no_grad()
def sample_ddim(model, x, diffusion, model_kwargs=None, progress=True, eta=0.0):
    """DDIM (Song et al. 2021, Eq. 12): eta = 0 is deterministic, eta = 1 is DDPM with the posterior
    variance. Run it on a "ddimN" respacing; noise is drawn at every step, as the official code."""
    at, ac = diffusion.at, diffusion.alphas_cumprod
    for i in tqdm(range(diffusion.num_timesteps - 1, -1, -1), disable=not progress):
        t = x.new_full((len(x),), i, dtype=torch.long)
        p = diffusion.p_mean_variance(model, x, t, model_kwargs)
        # eps consistent with x_0^ (Ho et al. Eq. 4)
        eps = (at((1 / ac).sqrt(), t) * x - p["pred_xstart"]) / at((1 / ac - 1).sqrt(), t)
        alpha_bar, alpha_bar_prev = at(ac, t), at(diffusion.alphas_cumprod_prev, t)
        sigma = (eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
                 * torch.sqrt(1 - alpha_bar / alpha_bar_prev))  # Eq. 16
        mean = (p["pred_xstart"] * torch.sqrt(alpha_bar_prev)
                + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps)
        x = mean + sigma * torch.randn_like(x)  # sigma is 0 at the last step (alpha_bar_prev = 1)
    return x


@torch.no_grad()
def sample_dpm_solver(model, x, diffusion, model_kwargs=None, progress=True, steps=20):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) at "linspace" timesteps (999, 949, ..., 50) to
    sigma = 0, as diffusers' DPMSolverMultistepScheduler (order 2, lower_order_final)."""
    n = diffusion.num_timesteps
    # numpy's own linspace and round-half-to-even, so ties (e.g. 499.5) round as diffusers does
    index = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].astype(np.int64).tolist()
    alpha_bar = diffusion.alphas_cumprod[index].tolist() + [1.0]  # sigma = 0 after the last step
    alpha = [math.sqrt(a) for a in alpha_bar]
    sigma = [math.sqrt(1 - a) for a in alpha_bar]
    lam = [math.log(a / s) if s > 0 else math.inf for a, s in zip(alpha, sigma)]
    x0_prev = None
    for i in tqdm(range(steps), disable=not progress):
        t = x.new_full((len(x),), int(diffusion.timestep_map[index[i]]), dtype=torch.long)
        eps = model(x, t, **(model_kwargs or {}))[:, : x.shape[1]]  # (the variance is not used)
        x0 = (x - sigma[i] * eps) / alpha[i]  # x_theta(x_t, t)
        h = lam[i + 1] - lam[i]
        if x0_prev is None or i == steps - 1:  # no history yet; at the end h = inf
            d = x0
        else:
            r = (lam[i] - lam[i - 1]) / h  # r_i = h_{i-1} / h_i
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev  # D_i
        x = (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * math.expm1(-h) * d  # Alg. 2's update
        x0_prev = x0
    return x


SAMPLER_STEPS = {"ddpm": 250, "ddim": 50, "dpm++": 20}  # DDPM: DiT's and FineDiffusion's 250
STEP_RANGES = {"ddpm": (2, 1000), "ddim": (2, 1000), "dpm++": (1, 999)}  # what each can do of 1000


def check_steps(name, steps):
    """A ValueError saying the valid range, unless sampler `name` can take `steps` model calls."""
    low, high = STEP_RANGES[name]
    if not low <= steps <= high:
        raise ValueError(f"{name} takes {low} to {high} steps, not {steps}")
    if name == "ddim":
        space_timesteps(1000, f"ddim{steps}")  # raises for a count no integer stride gives


# --------------------------------------------------------------------------------------------------
# Guided sampling: classifier-free guidance (Ho & Salimans 2022) and FineDiffusion's Eq. 1

def guided(model, labels, parents, scale=4.0, guided_channels=None):
    """`model(x, t, y)` guided to `labels` (N,), away from rows `parents` (N,), on the doubled batch
    [z, z] as the official code; Eq. 1 on every eps channel, or the first `guided_channels` (3)."""
    y = torch.cat([labels, parents])

    def model_fn(x, t):
        half = x[: len(x) // 2]
        out = model(torch.cat([half, half]), t, y)  # (2N, 2C, H, W)
        k = guided_channels or x.shape[1]
        cond_eps, parent_eps = out[:, :k].chunk(2)
        eps = parent_eps + scale * (cond_eps - parent_eps)  # FineDiffusion Eq. 1 (w = scale)
        return torch.cat([torch.cat([eps, eps]), out[:, k:]], dim=1)

    return model_fn


def default_guidance(model):
    """A DiT's own guidance: "fine" (Eq. 1) where its table has superclass rows, else "cfg"."""
    return "fine" if model.y_embedder.num_superclasses else "cfg"


def sample(model, z, labels, guidance=None, scale=4.0, sampler="ddpm", steps=None,
           guided_channels=None, progress=True):
    """Noise z (N, C, H, W) -> x_0 of `labels` (N,) by `sampler` in `steps` model calls, guided away
    from the superclass row ("fine", Eq. 1), the null row ("cfg"), or not ("none")."""
    guidance = guidance or default_guidance(model)
    if guidance == "none":
        model_fn, x = (lambda x, t: model(x, t, labels)), z
    else:
        parents = model.y_embedder.parent_rows(labels, guidance)
        model_fn, x = guided(model, labels, parents, scale, guided_channels), torch.cat([z, z])
    steps = steps or SAMPLER_STEPS[sampler]
    if sampler == "dpm++":  # the full chain, at diffusers' timesteps
        x = sample_dpm_solver(model_fn, x, create_diffusion(""), progress=progress, steps=steps)
    elif sampler == "ddim":
        x = sample_ddim(model_fn, x, create_diffusion(f"ddim{steps}"), progress=progress)
    else:  # DDPM on `steps` evenly respaced timesteps
        x = sample_ddpm(model_fn, x, create_diffusion(str(steps)), progress=progress)
    return x[: len(z)]
