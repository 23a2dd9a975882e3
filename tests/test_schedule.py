"""Schedules, forward process, conversions, training target, spacings, Karras sigmas and SchedulerConfig.

References: diffusers' schedulers (betas, alphas_cumprod, add_noise, get_velocity, _sigma_to_t) and formulas
written out independently here (plain Python loops in float64), plus the published SD values in
../shared/docs/sd-reference.md §3.
"""
import dataclasses
import json
import math

import numpy as np
import pytest

from minisd.diffusion import (SD15_SCHEDULER, SchedulerConfig, alpha_bar_at, eps_from_prediction, karras_sigmas,
                              make_alphas_cumprod, make_betas, q_sample, sample_timesteps, sigma_to_t,
                              sigmas_from_alphas_cumprod, snr, spaced_timesteps, training_target, v_from_x0_eps,
                              velocity, x0_from_prediction)
from minisd.testing import rel_error

CONFIGS = {
    "linear": SchedulerConfig(beta_schedule="linear"),
    "scaled_linear": SD15_SCHEDULER,
    "squaredcos_cap_v2": SchedulerConfig(beta_schedule="squaredcos_cap_v2"),
}


# ----------------------------------------------------------------------------------------------------------------
# betas and alphas_cumprod

def _betas_loop(cfg):
    """Independent float64 betas, one Python float at a time."""
    T, out = cfg.num_train_timesteps, []
    for i in range(T):
        if cfg.beta_schedule == "linear":
            out.append(cfg.beta_start + (cfg.beta_end - cfg.beta_start) * i / (T - 1))
        elif cfg.beta_schedule == "scaled_linear":
            a, b = math.sqrt(cfg.beta_start), math.sqrt(cfg.beta_end)
            out.append((a + (b - a) * i / (T - 1)) ** 2)
        else:
            f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
            out.append(min(1 - f((i + 1) / T) / f(i / T), 0.999))
    return np.array(out)


@pytest.mark.parametrize("schedule", list(CONFIGS))
def test_betas_and_alphas_cumprod_float64_match_independent_loop(schedule):
    cfg = CONFIGS[schedule]
    betas = make_betas(cfg, dtype=np.float64)
    ref = _betas_loop(cfg)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert rel_error(betas, ref) < 1e-13
    abar, run = [], 1.0
    for b in ref:
        run *= 1 - b
        abar.append(run)
    assert rel_error(make_alphas_cumprod(betas), abar) < 1e-13


@pytest.mark.parametrize("schedule", list(CONFIGS))
def test_betas_and_alphas_cumprod_match_diffusers(schedule):
    diffusers = pytest.importorskip("diffusers")
    cfg = CONFIGS[schedule]
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                                  beta_schedule=schedule)
    betas = make_betas(cfg)
    abar = make_alphas_cumprod(betas)
    assert betas.dtype == np.float32 and abar.dtype == np.float32
    # diffusers builds betas with torch's float32 linspace, we round float64 values once: a few ulps apart
    assert rel_error(betas, ref.betas.numpy()) < 1e-6
    assert np.max(np.abs(abar / ref.alphas_cumprod.numpy() - 1)) < 1e-6  # elementwise, even where abar is tiny


def test_sd_schedule_published_values():
    """sd-reference.md §3: abar_0 = 0.99915, abar_999 = 0.0046601, sigma_min 0.029168, sigma_max 14.614655 (fp32)."""
    abar = make_alphas_cumprod(make_betas(SD15_SCHEDULER))
    sig = sigmas_from_alphas_cumprod(abar)
    assert abs(abar[0] - 0.99915) < 5e-6 and abs(abar[-1] - 0.0046601) < 5e-8
    assert abs(sig[0] - 0.029168) < 5e-7 and abs(sig[-1] - 14.614655) < 5e-5
    sig64 = sigmas_from_alphas_cumprod(make_alphas_cumprod(make_betas(SD15_SCHEDULER, np.float64)))
    assert abs(sig64[-1] - 14.614641) < 5e-6  # LDM's float64 schedule (differs from fp32 in the 6th digit)


def test_trained_betas_and_snr(rng):
    betas = np.linspace(1e-4, 0.03, 50)
    cfg = SchedulerConfig(num_train_timesteps=50, trained_betas=list(betas))
    np.testing.assert_array_equal(make_betas(cfg, np.float64), betas)
    abar = make_alphas_cumprod(make_betas(cfg, np.float64))
    s = snr(abar)
    assert rel_error(s, abar / (1 - abar)) < 1e-15
    assert rel_error(s, 1 / sigmas_from_alphas_cumprod(abar) ** 2) < 1e-12  # SNR = 1/sigma^2
    t = np.array([0, 7, 49])
    np.testing.assert_array_equal(snr(abar, t), s[t])
    assert np.all(np.diff(s) < 0)  # noise only grows with t


# ----------------------------------------------------------------------------------------------------------------
# forward process, conversions, training target

def _abar64():
    return make_alphas_cumprod(make_betas(SD15_SCHEDULER, np.float64))


def test_q_sample_per_batch_timesteps_matches_formula_and_diffusers(rng):
    abar = _abar64()
    x0 = rng.standard_normal((3, 4, 5, 7))
    noise = rng.standard_normal(x0.shape)
    t = np.array([0, 500, 999])
    xt = q_sample(x0, t, noise, abar)
    for n in range(3):  # independent formula, one batch element at a time
        ref = math.sqrt(abar[t[n]]) * x0[n] + math.sqrt(1 - abar[t[n]]) * noise[n]
        assert rel_error(xt[n], ref) < 1e-14
    np.testing.assert_allclose(q_sample(x0, 250, noise, abar), math.sqrt(abar[250]) * x0 +
                               math.sqrt(1 - abar[250]) * noise, rtol=1e-14)
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler.from_config(dict(SD15_SCHEDULER.to_dict()))
    abar32 = make_alphas_cumprod(make_betas(SD15_SCHEDULER))
    x32, n32 = x0.astype(np.float32), noise.astype(np.float32)
    got = q_sample(x32, t, n32, abar32)
    want = ref.add_noise(torch.from_numpy(x32), torch.from_numpy(n32), torch.from_numpy(t)).numpy()
    assert got.dtype == np.float32 and rel_error(got, want) < 1e-6
    got_v = velocity(x32, n32, t, abar32)
    want_v = ref.get_velocity(torch.from_numpy(x32), torch.from_numpy(n32), torch.from_numpy(t)).numpy()
    assert got_v.dtype == np.float32 and rel_error(got_v, want_v) < 1e-6


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_prediction_conversions_round_trip(rng, kind):
    """x_t built from (x0, eps); the target for each prediction type must map back to the same x0 and eps."""
    abar = _abar64()
    x0 = rng.standard_normal((3, 2, 3, 3))
    eps = rng.standard_normal(x0.shape)
    t = np.array([3, 400, 990])
    a = alpha_bar_at(abar, t, x0)  # (3, 1, 1, 1)
    assert a.shape == (3, 1, 1, 1)
    xt = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps  # written out, not q_sample
    target = training_target(x0, eps, t, kind, abar)
    want = {"epsilon": eps, "sample": x0, "v_prediction": np.sqrt(a) * eps - np.sqrt(1 - a) * x0}[kind]
    assert rel_error(target, want) < 1e-15
    assert rel_error(x0_from_prediction(target, xt, a, kind), x0) < 1e-12
    assert rel_error(eps_from_prediction(target, xt, a, kind), eps) < 1e-12
    assert rel_error(v_from_x0_eps(x0, eps, a), np.sqrt(a) * eps - np.sqrt(1 - a) * x0) < 1e-15
    # a scalar noise level works the same way (what the samplers pass)
    a1 = float(abar[400])
    xt1 = math.sqrt(a1) * x0 + math.sqrt(1 - a1) * eps
    out1 = training_target(x0, eps, 400, kind, abar)
    assert rel_error(x0_from_prediction(out1, xt1, a1, kind), x0) < 1e-12


def test_velocity_identity(rng):
    """v is x_t rotated by 90 degrees in the (x0, eps) plane: |x_t|^2 + |v|^2 = |x0|^2 + |eps|^2 per element."""
    abar = _abar64()
    x0, eps = rng.standard_normal((2, 5)), rng.standard_normal((2, 5))
    t = np.array([10, 900])
    xt, v = q_sample(x0, t, eps, abar), velocity(x0, eps, t, abar)
    assert rel_error(xt ** 2 + v ** 2, x0 ** 2 + eps ** 2) < 1e-13


def test_forward_bad_input(rng):
    abar = _abar64()
    x0 = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"q_sample: argument 'noise' must have shape \(2, 3\)"):
        q_sample(x0, 5, np.zeros((2, 4), np.float32), abar)
    with pytest.raises(ValueError, match="dtype"):
        q_sample(x0, 5, np.zeros((2, 3)), abar)
    with pytest.raises(ValueError, match=r"argument 't' must be a scalar or have shape \(2,\)"):
        q_sample(x0, np.array([1, 2, 3]), x0, abar)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        training_target(x0, x0, 1, "eps", abar)
    t = sample_timesteps(rng, 10000, 1000)
    assert t.dtype == np.int64 and t.min() >= 0 and t.max() <= 999 and len(np.unique(t)) > 990


# ----------------------------------------------------------------------------------------------------------------
# spacings, Karras sigmas, sigma -> t

def test_spacings_published_values():
    """sd-reference.md §3 (Lin et al. 2023 Table 2) for S = 50, T = 1000."""
    t = spaced_timesteps(SD15_SCHEDULER, 50)  # leading + steps_offset 1
    np.testing.assert_array_equal(t, np.arange(981, 0, -20))
    t = spaced_timesteps(dataclasses.replace(SD15_SCHEDULER, timestep_spacing="trailing"), 50)
    np.testing.assert_array_equal(t, np.arange(999, 0, -20))
    lin = dataclasses.replace(SD15_SCHEDULER, timestep_spacing="linspace")
    t = spaced_timesteps(lin, 50)
    assert t[0] == 999 and t[1] == 979 and t[2] == 958 and t[-2] == 20 and t[-1] == 0
    tf = spaced_timesteps(lin, 50, integer=False)
    assert tf.dtype == np.float32 and rel_error(tf, 999 - np.arange(50) * 999 / 49) < 1e-7


def test_karras_sigmas_formula():
    s = karras_sigmas(0.0292, 14.6146, 10)
    ref = [(14.6146 ** (1 / 7) + i / 9 * (0.0292 ** (1 / 7) - 14.6146 ** (1 / 7))) ** 7 for i in range(10)]
    assert rel_error(s, ref) < 1e-14
    assert abs(s[0] - 14.6146) < 1e-12 and abs(s[-1] - 0.0292) < 1e-15


def test_sigma_to_t_inverts_the_table_and_matches_diffusers():
    sig = sigmas_from_alphas_cumprod(make_alphas_cumprod(make_betas(SD15_SCHEDULER)))
    log_sig = np.log(sig)
    assert rel_error(sigma_to_t(sig, log_sig), np.arange(1000)) < 1e-5  # table entries map to their own t
    mid = np.sqrt(sig[:-1] * sig[1:])  # geometric midpoints lie exactly halfway in log sigma
    assert rel_error(sigma_to_t(mid, log_sig), np.arange(999) + 0.5) < 1e-5
    assert sigma_to_t(np.array([0.0, 1e3]), log_sig).tolist() == [0.0, 999.0]  # clamped at the ends
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.EulerDiscreteScheduler()
    probe = karras_sigmas(float(sig[0]), float(sig[-1]), 37)
    want = np.array([ref._sigma_to_t(np.array(s), log_sig) for s in probe])
    np.testing.assert_array_equal(sigma_to_t(probe, log_sig), want)


# ----------------------------------------------------------------------------------------------------------------
# SchedulerConfig

def test_sd15_preset_equals_shared_json(shared_dir):
    path = shared_dir / "data/sd15_configs/scheduler/scheduler_config.json"
    assert SchedulerConfig.from_json(path) == SD15_SCHEDULER
    with open(path) as f:
        raw = json.load(f)
    for key, value in raw.items():
        if not key.startswith("_"):
            assert getattr(SD15_SCHEDULER, key) == value, key


def test_config_from_dict_rules():
    d = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.6.0", "beta_start": 0.00085, "beta_end": 0.012,
         "beta_schedule": "scaled_linear", "thresholding": False, "sample_max_value": 1.0, "variance_type": None}
    cfg = SchedulerConfig.from_dict(d)
    assert cfg.beta_schedule == "scaled_linear" and cfg.variance_type == "fixed_small"
    with pytest.raises(ValueError, match=r"beta_schedule must be one of \['linear', 'scaled_linear', "
                                         r"'squaredcos_cap_v2'\], got 'cosine'"):
        SchedulerConfig.from_dict({"beta_schedule": "cosine"})
    with pytest.raises(ValueError, match="thresholding=True is not supported"):
        SchedulerConfig.from_dict({"thresholding": True})
    with pytest.raises(ValueError, match="rescale_betas_zero_snr=True is not supported"):
        SchedulerConfig.from_dict({"rescale_betas_zero_snr": True})
    with pytest.raises(ValueError, match=r"prediction_type must be one of .* got 'flow_prediction'"):
        SchedulerConfig.from_dict({"prediction_type": "flow_prediction"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['shift'\]"):
        SchedulerConfig.from_dict({"shift": 3.0})
    assert SchedulerConfig.from_dict({"shift": 3.0}, strict=False) == SchedulerConfig()
    with pytest.raises(ValueError, match="beta_start < beta_end"):
        SchedulerConfig(beta_start=0.02, beta_end=0.01)
    with pytest.raises(ValueError, match="trained_betas has 3 values"):
        SchedulerConfig(trained_betas=[0.1, 0.2, 0.3])
    with pytest.raises(dataclasses.FrozenInstanceError):
        SD15_SCHEDULER.steps_offset = 0
    assert SchedulerConfig.from_dict(SD15_SCHEDULER.to_dict()) == SD15_SCHEDULER


def test_config_accepts_every_diffusers_class_config():
    """The full .config of each reproduced diffusers scheduler loads in strict mode and keeps its values."""
    diffusers = pytest.importorskip("diffusers")
    for name in ["DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
                 "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler", "DPMSolverMultistepScheduler"]:
        d = dict(getattr(diffusers, name).from_config(SD15_SCHEDULER.to_dict()).config)
        cfg = SchedulerConfig.from_dict(d)
        for key in ("beta_start", "beta_end", "beta_schedule", "steps_offset", "timestep_spacing", "prediction_type"):
            assert getattr(cfg, key) == d[key], (name, key)
