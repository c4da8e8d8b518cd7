"""diffusion.py against the official DiT `diffusion/` package and FineDiffusion's sampler, plus properties."""
import pytest
import torch

from conftest import dit_from_fixture, fixture, rel_err
from diffusion import create_diffusion, guided, sample_ddim, sample_ddpm, sample_dpm_solver, space_timesteps

RESPACINGS = ["respaced_250", "respaced_25"]  # the fixture's entries; the respacing string is the name's suffix


@pytest.fixture(scope="module")
def ref():
    return fixture("diffusion_tiny.pt")


@pytest.fixture(scope="module")
def model():
    return dit_from_fixture(fixture("dit_tiny.pt"))


def respaced(name):
    return create_diffusion(name.split("_")[1])


# -----------------------------------------------------------------------------------------------------------
# Golden outputs of the official code


def test_schedule_matches_official(ref):
    diffusion = create_diffusion("")
    assert diffusion.num_timesteps == len(ref["betas"])
    assert diffusion.betas.dtype == torch.float64 and rel_err(diffusion.betas, ref["betas"]) <= 1e-10


def test_training_losses_match_official(ref, model):
    with torch.no_grad():
        out = create_diffusion("").training_losses(model, ref["x_start"], ref["t"], dict(y=ref["y"]), ref["noise"])
    for key in ("loss", "mse", "vb"):
        assert out[key].shape == ref[key].shape and rel_err(out[key], ref[key]) <= 1e-4, key


@pytest.mark.parametrize("name", RESPACINGS)
def test_respacing_matches_official(ref, name):
    r, diffusion = ref[name], respaced(name)
    assert torch.equal(torch.tensor(space_timesteps(1000, name.split("_")[1])), r["use_timesteps"])
    assert torch.equal(diffusion.timestep_map, r["timestep_map"])
    assert diffusion.betas.shape == r["betas"].shape and (diffusion.betas - r["betas"]).abs().max() <= 1e-10


@pytest.mark.parametrize("name", RESPACINGS)
def test_p_mean_variance_matches_official(ref, model, name):
    r = ref[name]
    with torch.no_grad():
        out = respaced(name).p_mean_variance(model, r["x_t"], r["t_index"], dict(y=ref["y"]))
    for key in ("mean", "variance", "log_variance", "pred_xstart"):
        assert rel_err(out[key], r[key]) <= 1e-4, key


@pytest.mark.parametrize("name", RESPACINGS)
def test_ddpm_loop_matches_official(ref, model, name):
    r = ref[name]
    torch.manual_seed(r["ddpm_seed"])
    x = sample_ddpm(model, r["loop_noise"], respaced(name), dict(y=ref["y"]), progress=False)
    assert rel_err(x, r["ddpm_sample"]) <= 1e-3


@pytest.mark.parametrize("name", RESPACINGS)
def test_ddim_loop_matches_official(ref, model, name):
    r = ref[name]
    torch.manual_seed(r["ddpm_seed"])
    x = sample_ddim(model, r["loop_noise"], respaced(name), dict(y=ref["y"]), progress=False, eta=0.0)
    assert rel_err(x, r["ddim_eta0_sample"]) <= 1e-3


@pytest.mark.parametrize("name", RESPACINGS)
def test_guided_loop_matches_official(ref, model, name):
    """Guidance is the guided model callable on a doubled batch, fed to the ordinary sampler."""
    r = ref[name]
    n = len(r["guided_y"]) // 2
    model_fn = guided(model, r["guided_y"][:n], r["guided_y"][n:], r["guided_scale"], guided_channels=3)
    torch.manual_seed(r["guided_seed"])
    x = sample_ddpm(model_fn, r["guided_noise"][:n].repeat(2, 1, 1, 1), respaced(name), progress=False)
    assert torch.equal(r["guided_noise"][:n], r["guided_noise"][n:])  # the official [z, z]
    assert rel_err(x, r["guided_sample_first3channels"]) <= 1e-3


def test_official_finediffusion_guided_loop():
    """As FineDiffusion's sample.py: noise [z, z], labels [fine, superclass row], DDPM on str(steps) steps."""
    f = fixture("finediffusion_official_tiny.pt")
    model = dit_from_fixture(f)
    model_fn = guided(model, f["sub_labels"], f["super_labels"], f["scale"], guided_channels=3)
    torch.manual_seed(f["seed"])
    x = sample_ddpm(model_fn, f["noise"].repeat(2, 1, 1, 1), create_diffusion(str(f["steps"])), progress=False)
    assert rel_err(x, f["guided_sample_first3channels"]) <= 1e-3


def test_dpm_solver_matches_diffusers():
    """
    diffusers' DPMSolverMultistepScheduler (DPM-Solver++(2M)) driving the official FineDiffusion model, guided by
    Eq. 1 on all eps channels. The state after step k is what the model sees at call k + 1, so a recording wrapper
    gives the intermediate states without a test-only hook in the sampler.
    """
    f = fixture("dpm_solver_tiny.pt")
    model, n = dit_from_fixture(f), len(f["noise"])
    model_fn = guided(model, f["sub_labels"], f["super_labels"], f["scale"])
    seen_t, seen_x = [], []

    def recorded(x, t):
        seen_t.append(t[0].item())
        seen_x.append(x[:n])
        return model_fn(x, t)

    x = sample_dpm_solver(recorded, f["noise"].repeat(2, 1, 1, 1), create_diffusion(""), progress=False,
                          steps=f["steps"])[:n]
    assert seen_t == f["timesteps"].tolist()
    assert rel_err(seen_x[1], f["after_first_step"]) <= 1e-3
    assert rel_err(seen_x[2], f["after_second_step"]) <= 1e-3
    assert rel_err(x, f["sample"]) <= 1e-3


# -----------------------------------------------------------------------------------------------------------
# Properties that must hold


def test_q_sample_statistics(ref):
    """Over many noise draws x_t has mean sqrt(alpha_bar_t) x_0 and variance 1 - alpha_bar_t = 1 - prod(1 - beta)."""
    torch.manual_seed(0)
    diffusion, n = create_diffusion(""), 20000
    x_start = torch.linspace(-1, 1, 16).view(1, 1, 4, 4)
    for step in (0, 300, 999):
        alpha_bar = torch.prod(1 - ref["betas"][: step + 1]).item()
        x_t = diffusion.q_sample(x_start.expand(n, -1, -1, -1), torch.full((n,), step), torch.randn(n, 1, 4, 4))
        mean_tol = 5 * ((1 - alpha_bar) / n) ** 0.5
        assert (x_t.mean(0) - alpha_bar ** 0.5 * x_start[0]).abs().max() <= mean_tol
        assert (x_t.var(0) / (1 - alpha_bar) - 1).abs().max() <= 5 * (2 / n) ** 0.5


def test_respacing_keeps_the_marginals():
    """The kept chain's alpha_bar are exactly the original alpha_bar at the kept timesteps."""
    full, spaced = create_diffusion(""), create_diffusion("10,20")
    assert torch.allclose(spaced.alphas_cumprod, full.alphas_cumprod[spaced.timestep_map], rtol=1e-12, atol=0)


def test_ddim50_is_evenly_strided():
    steps = torch.tensor(space_timesteps(1000, "ddim50"))
    strides = steps.diff()
    assert len(steps) == 50 and steps[0] == 0 and (strides == strides[0]).all() and steps[-1] + strides[0] >= 1000


def test_sections_respacing():
    """"10,20": 10 steps spread over the first 500 timesteps and 20 over the last 500, section ends included."""
    steps = space_timesteps(1000, "10,20")
    first, second = [s for s in steps if s < 500], [s for s in steps if s >= 500]
    assert len(first) == 10 and len(second) == 20 and steps == sorted(set(steps))
    assert (first[0], first[-1], second[0], second[-1]) == (0, 499, 500, 999)
    with pytest.raises(ValueError):
        space_timesteps(1000, "600,10")


def test_ddim_eta0_is_deterministic(ref, model):
    """eta = 0 ignores the noise it draws, so the seed does not matter; eta = 1 does depend on it."""
    r, diffusion = ref["respaced_25"], create_diffusion("ddim25")
    runs = {}
    for eta in (0.0, 1.0):
        for seed in (1, 2):
            torch.manual_seed(seed)
            runs[eta, seed] = sample_ddim(model, r["loop_noise"], diffusion, dict(y=ref["y"]), progress=False, eta=eta)
    assert torch.equal(runs[0.0, 1], runs[0.0, 2]) and not torch.allclose(runs[1.0, 1], runs[1.0, 2])


@pytest.mark.parametrize("sampler,spacing", [(sample_ddpm, "25"), (sample_ddim, "ddim25")])
def test_samplers_recover_a_point_mass(sampler, spacing):
    """
    For data that is one point x_0 the exact eps(x_t, t) = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t), in
    original timesteps; both samplers must then land on x_0, which needs the respaced chain to pass the model
    timestep_map[i] (not i) and to end with mean = x_0^.
    """
    torch.manual_seed(0)
    alpha_bar = create_diffusion("").alphas_cumprod.float()
    x_start = torch.rand(2, 4, 8, 8) * 2 - 1

    def exact_eps(x, t):
        a = alpha_bar[t].view(-1, 1, 1, 1)
        return torch.cat([(x - a.sqrt() * x_start) / (1 - a).sqrt(), torch.zeros_like(x)], dim=1)

    x = sampler(exact_eps, torch.randn(2, 4, 8, 8), create_diffusion(spacing), progress=False)
    assert (x - x_start).abs().max() <= 1e-4


def test_dpm_solver_solves_the_ode_of_gaussian_data():
    """
    For data x_0 ~ N(mu, s^2 I) the marginal of x_t is N(sqrt(a) mu, (a s^2 + 1 - a) I), a = alpha_bar_t, the exact
    eps(x_t, t) = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a), and the probability-flow ODE keeps the
    standardized z = (x_t - sqrt(a) mu) / sqrt(a s^2 + 1 - a), so it ends at x_0 = mu + s z. 20 steps of the
    second-order DPM-Solver++ must land there far closer than 20 first-order DDIM steps.
    """
    torch.manual_seed(0)
    # s = 1.5: for much narrower data the error is set by the last, first-order jump from t = 50 to sigma = 0
    alpha_bar, s = create_diffusion("").alphas_cumprod.float(), 1.5
    mu, z = torch.rand(2, 3, 4, 4) * 2 - 1, torch.randn(2, 3, 4, 4)

    def exact_eps(x, t):
        a = alpha_bar[t].view(-1, 1, 1, 1)
        return torch.cat([(1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s ** 2 + 1 - a), torch.zeros_like(x)], dim=1)

    def marginal(t):  # x_t on the ODE trajectory through standardized noise z
        a = alpha_bar[t]
        return a.sqrt() * mu + (a * s ** 2 + 1 - a).sqrt() * z

    # DPM-Solver++ starts at 999 and DDIM's ddim20 at 950: each starts on its own timestep's marginal with the
    # same z, so both have the same exact answer mu + s z
    ddim = create_diffusion("ddim20")
    dpm_x = sample_dpm_solver(exact_eps, marginal(999), create_diffusion(""), progress=False, steps=20)
    ddim_x = sample_ddim(exact_eps, marginal(ddim.timestep_map[-1]), ddim, progress=False)
    dpm_err, ddim_err = rel_err(dpm_x, mu + s * z), rel_err(ddim_x, mu + s * z)
    assert dpm_err <= 1e-2 and dpm_err < ddim_err / 5  # measured: 4.3e-3 and 6.9e-2


def test_vb_trains_only_the_variance():
    """The VLB term sees the eps channels detached (Improved DDPM Sec. 3.1): its gradient reaches v only."""
    torch.manual_seed(0)
    diffusion = create_diffusion("")
    output = torch.randn(3, 8, 4, 4, requires_grad=True)
    x_start, t = torch.rand(3, 4, 4, 4) * 2 - 1, torch.tensor([0, 10, 900])
    losses = diffusion.training_losses(lambda x, t: output, x_start, t)
    (eps_grad_vb,) = torch.autograd.grad(losses["vb"].sum(), output, retain_graph=True)
    (eps_grad_mse,) = torch.autograd.grad(losses["mse"].sum(), output)
    assert (eps_grad_vb[:, :4] == 0).all() and (eps_grad_vb[:, 4:] != 0).all()
    assert (eps_grad_mse[:, 4:] == 0).all() and (eps_grad_mse[:, :4] != 0).any()
