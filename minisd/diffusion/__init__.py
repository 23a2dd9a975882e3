"""Diffusion: noise schedules and the training target (schedule.py) and the samplers.

    schedule.py         SchedulerConfig (+ SD15_SCHEDULER), betas, alphas_cumprod, q_sample, eps/x0/v
                        conversions, SNR, training_target, timestep spacings, Karras sigmas
    samplers.py         Sampler base class; DDPM, DDIM, PNDM/PLMS (step the discrete chain)
    sigma_samplers.py   Euler, Euler ancestral, LMS, DPM-Solver++ 2M (integrate in sigma)

`make_sampler("dpmpp_2m", SD15_SCHEDULER, karras=True)` builds one by name.
"""
import dataclasses

from .samplers import DDIMSampler, DDPMSampler, PNDMSampler, Sampler
from .schedule import (SD15_SCHEDULER, SchedulerConfig, alpha_bar_at, eps_from_prediction, karras_sigmas,
                       make_alphas_cumprod, make_betas, q_sample, sample_timesteps, sigma_to_t,
                       sigmas_from_alphas_cumprod, snr, spaced_timesteps, training_target, v_from_x0_eps,
                       velocity, x0_from_prediction)
from .sigma_samplers import DPMSolverMultistepSampler, EulerAncestralSampler, EulerSampler, LMSSampler

SAMPLERS = {
    "ddpm": DDPMSampler,
    "ddim": DDIMSampler,
    "pndm": PNDMSampler,  # PLMS when config.skip_prk_steps (SD)
    "euler": EulerSampler,
    "euler_a": EulerAncestralSampler,
    "lms": LMSSampler,
    "dpmpp_2m": DPMSolverMultistepSampler,
}
KARRAS_SAMPLERS = ("euler", "euler_a", "lms", "dpmpp_2m")


def make_sampler(name, config=SD15_SCHEDULER, karras=False, **kwargs):
    """Build a sampler by name: ddpm | ddim | pndm | euler | euler_a | lms | dpmpp_2m.

    karras=True switches on Karras sigmas (euler, euler_a, lms, dpmpp_2m only). For "dpmpp_2m" the solver
    settings are forced to DPM++ 2M (dpmsolver++, order 2); kwargs go to the class (e.g. eta= for ddim).
    """
    if name not in SAMPLERS:
        raise ValueError(f"make_sampler: unknown sampler {name!r}; valid names: {', '.join(SAMPLERS)}")
    if karras:
        if name not in KARRAS_SAMPLERS:
            raise ValueError(f"make_sampler: karras=True needs one of {', '.join(KARRAS_SAMPLERS)}, got {name!r}")
        config = dataclasses.replace(config, use_karras_sigmas=True)
    if name == "dpmpp_2m":
        config = dataclasses.replace(config, algorithm_type="dpmsolver++", solver_order=2)
    return SAMPLERS[name](config, **kwargs)


__all__ = ["SAMPLERS", "KARRAS_SAMPLERS", "make_sampler", "Sampler", "DDPMSampler", "DDIMSampler", "PNDMSampler",
           "EulerSampler", "EulerAncestralSampler", "LMSSampler", "DPMSolverMultistepSampler", "SchedulerConfig",
           "SD15_SCHEDULER", "make_betas", "make_alphas_cumprod", "sigmas_from_alphas_cumprod", "snr",
           "alpha_bar_at", "q_sample", "velocity", "x0_from_prediction", "eps_from_prediction", "v_from_x0_eps",
           "training_target", "sample_timesteps", "spaced_timesteps", "karras_sigmas", "sigma_to_t"]
