"""DPM-Solver++ (multistep, orders 1-3, ODE and SDE) with diffusers' API and numbers.

`DPMSolverMultistepScheduler` mirrors diffusers' class of the same name: the same config fields
and defaults, the same inference schedule (`timestep_spacing`, Karras / exponential / Lu-lambda /
flow sigmas, `final_sigmas_type`, `lambda_min_clipped`) and the same step: the model output is
converted to a data prediction x0 (thresholded when asked), x0 joins the history of earlier data
predictions, and an order-k multistep update gives the previous sample. Each step is one
`genext::sampler_step` call (mode 2) whose scalar coefficients are computed on the host from a CPU
copy of the float32 sigmas with the same 0-dim float32 torch ops diffusers uses, so the rounding is
identical; the warm-up and final lower-order logic and the history live on the host, as in
diffusers. Coefficients are cached per (step, order) while the schedule is unchanged, so a second
sampling run with the same schedule spends no host time on them.

The original (noise-prediction) DPM-Solver, `algorithm_type` "dpmsolver" / "sde-dpmsolver", runs
through the same mode with the noise prediction in place of x0 (the op's prediction_type picks the
conversion); with thresholding it takes a marked fallback (see `_dpmsolver_thresholded_eps`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..ops._sampler_step import PredictionType, StepKind, sampler_step

# diffusers' pipeline loader looks a component's base class up by name in the module that
# model_index.json records (this one): SchedulerMixin must be an attribute here
from ._base import (
    KARRAS_COMPATIBLES,
    SchedulerBase,
    SchedulerMixin,  # noqa: F401
    SchedulerOutput,
    check_tensor,
)
from ._schedule import (
    check_choice,
    make_alphas_cumprod,
    make_betas,
    randn_like_diffusers,
    rescale_zero_terminal_snr,
    threshold_scale,
)

_OWNER = "DPMSolverMultistepScheduler"
_ALGORITHMS = ("dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++")
_PREDICTIONS = ("epsilon", "sample", "v_prediction", "flow_prediction")


class DPMSolverMultistepScheduler(SchedulerBase):
    """Multistep DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095), a drop-in for diffusers'
    `DPMSolverMultistepScheduler`: constructor arguments with diffusers' names and defaults,
    `from_config`, `set_timesteps`, `step` (plus `guidance_scale=` for fused classifier-free
    guidance), `add_noise`, `scale_model_input`.

    Not supported: `use_beta_sigmas` (needs scipy; NotImplementedError), solver_order 3 with
    "sde-dpmsolver" (diffusers has no such update either; NotImplementedError).
    """

    order = 1
    init_noise_sigma = 1.0
    _compatibles = KARRAS_COMPATIBLES

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        self._register_config(locals())
        if int(use_karras_sigmas) + int(use_exponential_sigmas) + int(use_beta_sigmas) > 1:
            raise ValueError(
                f"{_OWNER}: use at most one of use_karras_sigmas, "
                "use_exponential_sigmas and use_beta_sigmas"
            )
        if use_beta_sigmas:
            raise NotImplementedError(
                f"{_OWNER}: use_beta_sigmas is not supported (it needs "
                "scipy's beta quantiles); use karras or exponential sigmas"
            )
        # diffusers quirk kept: the final-sigma check looks at the algorithm name as given, so
        # "deis" (mapped to dpmsolver++ below) still needs final_sigmas_type "sigma_min"
        if algorithm_type not in ("dpmsolver++", "sde-dpmsolver++") and final_sigmas_type == "zero":
            raise ValueError(
                f"{_OWNER}: final_sigmas_type 'zero' is not supported with "
                f"algorithm_type {algorithm_type!r}; choose 'sigma_min'"
            )
        # diffusers maps the names of its sibling solvers onto these (and records it in the config)
        if algorithm_type == "deis":
            algorithm_type = "dpmsolver++"
            self.register_to_config(algorithm_type=algorithm_type)
        if solver_type in ("logrho", "bh1", "bh2"):
            solver_type = "midpoint"
            self.register_to_config(solver_type=solver_type)
        check_choice("algorithm_type", algorithm_type, _ALGORITHMS, _OWNER)
        check_choice("solver_type", solver_type, ("midpoint", "heun"), _OWNER)
        check_choice("prediction_type", prediction_type, _PREDICTIONS, _OWNER)
        check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"), _OWNER)
        check_choice(
            "timestep_spacing", timestep_spacing, ("linspace", "leading", "trailing"), _OWNER
        )
        if solver_order not in (1, 2, 3):
            raise ValueError(f"{_OWNER}: solver_order must be 1, 2 or 3, got {solver_order!r}")
        if algorithm_type == "sde-dpmsolver" and solver_order == 3:
            raise NotImplementedError(
                f"{_OWNER}: solver_order 3 is not available with "
                "'sde-dpmsolver' (diffusers has no such update)"
            )

        betas = make_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, owner=_OWNER
        )
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = make_alphas_cumprod(betas)
        if rescale_betas_zero_snr:
            # as diffusers: not exactly 0, so the first sigma stays finite
            self.alphas_cumprod[-1] = 2**-24
        ac = self.alphas_cumprod
        self.alpha_t = torch.sqrt(ac)
        self.sigma_t = torch.sqrt(1 - ac)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.sigmas = ((1 - ac) / ac) ** 0.5

        self.num_inference_steps: int | None = None
        self.timesteps = torch.from_numpy(
            np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=np.float32)[
                ::-1
            ].copy()
        )
        self.model_outputs: list[Tensor | None] = [None] * solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None
        self._coef_cache: dict[tuple[int, int], tuple[list[float], int]] = {}
        self._set_host_schedule(self.timesteps, self.sigmas)

    # ---- schedule --------------------------------------------------------------------------------

    def _sigma_to_t(self, sigma: Any, log_sigmas: np.ndarray) -> np.ndarray:
        """Fractional training timestep whose log-sigma interpolates to log(sigma) (numpy, float64
        where diffusers' arithmetic is float64)."""
        log_sigma = np.log(np.maximum(sigma, 1e-10))
        diff = log_sigma - log_sigmas[:, np.newaxis]
        lo = np.cumsum(diff >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
        hi = lo + 1
        lo_v, hi_v = log_sigmas[lo], log_sigmas[hi]
        w = np.clip((lo_v - log_sigma) / (lo_v - hi_v), 0, 1)
        return ((1 - w) * lo + w * hi).reshape(np.shape(sigma))

    def _sigma_to_alpha_sigma_t(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha_t, sigma_t) of the VP process with noise-to-signal ratio `sigma`; with flow
        sigmas (1 - sigma, sigma)."""
        if self.config.use_flow_sigmas:
            return 1 - sigma, sigma
        alpha = 1 / ((sigma**2 + 1) ** 0.5)
        return alpha, sigma * alpha

    @staticmethod
    def _ramp(lo: float, hi: float, n: int, rho: float) -> np.ndarray:
        # Karras et al.'s rho-spacing between hi and lo, float64 numpy
        ramp = np.linspace(0, 1, n)
        lo_r, hi_r = lo ** (1 / rho), hi ** (1 / rho)
        return (hi_r + ramp * (lo_r - hi_r)) ** rho

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        mu: float | None = None,
        timesteps: Sequence[int] | None = None,
    ) -> None:
        """The inference schedule: `timesteps` (int64, on `device`) and `sigmas` (float32, CPU,
        one more than the timesteps: the final sigma, 0 or the training minimum). Spacing follows
        config.timestep_spacing unless a sigma respacing (Karras, exponential, Lu lambdas, flow)
        is configured or custom `timesteps` are given. `mu` (use_dynamic_shifting) sets the flow
        shift to exp(mu), changing the config like diffusers does."""
        cfg = self.config
        if mu is not None:
            if not (cfg.use_dynamic_shifting and cfg.time_shift_type == "exponential"):
                raise ValueError(
                    f"{_OWNER}: mu needs use_dynamic_shifting and an exponential time_shift_type"
                )
            self.register_to_config(flow_shift=np.exp(mu))
            cfg = self.config
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError(f"{_OWNER}: pass exactly one of num_inference_steps and timesteps")
        steps = num_inference_steps if timesteps is None else len(timesteps)
        if steps < 1:
            raise ValueError(
                f"{_OWNER}.set_timesteps: num_inference_steps must be at least 1, got {steps}"
            )
        if timesteps is not None:
            for flag in ("use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas"):
                if cfg[flag]:
                    raise ValueError(f"{_OWNER}: custom timesteps cannot be used with {flag}")

        T = cfg.num_train_timesteps
        if timesteps is not None:
            ts = np.array(timesteps).astype(np.int64)
        else:
            n = num_inference_steps
            # lambda_min_clipped drops the tail of timesteps whose log-SNR is below it
            clipped = torch.searchsorted(torch.flip(self.lambda_t, [0]), cfg.lambda_min_clipped)
            last = (T - clipped).numpy().item()
            if cfg.timestep_spacing == "linspace":
                ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
            elif cfg.timestep_spacing == "leading":
                ratio = last // (n + 1)
                ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
                ts += cfg.steps_offset
            else:  # trailing: note the ratio uses T, not the clipped length (as in diffusers)
                ts = np.arange(last, 0, -(T / n)).round().copy().astype(np.int64) - 1

        train_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()
        log_sigmas = np.log(train_sigmas)
        # diffusers quirk kept: with squaredcos_cap_v2 the respaced timesteps are not rounded, so
        # the int64 conversion below truncates them; exponential respacing never rounds
        rounds = cfg.beta_schedule != "squaredcos_cap_v2"

        def to_t(values: np.ndarray) -> np.ndarray:
            # one sigma at a time, as diffusers evaluates it (keeps numpy's scalar code path)
            return np.array([self._sigma_to_t(v, log_sigmas) for v in values])

        if cfg.use_karras_sigmas:
            desc = np.flip(train_sigmas).copy()
            sig = self._ramp(desc[-1].item(), desc[0].item(), num_inference_steps, 7.0)
            ts = to_t(sig)
            if rounds:
                ts = ts.round()
        elif cfg.use_lu_lambdas:
            lambdas = np.flip(log_sigmas.copy())
            lam = self._ramp(lambdas[-1].item(), lambdas[0].item(), num_inference_steps, 1.0)
            sig = np.exp(lam)
            ts = to_t(sig)
            if rounds:
                ts = ts.round()
        elif cfg.use_exponential_sigmas:
            desc = np.flip(train_sigmas).copy()
            sig = np.exp(
                np.linspace(
                    math.log(desc[0].item()), math.log(desc[-1].item()), num_inference_steps
                )
            )
            ts = to_t(sig)
        elif cfg.use_flow_sigmas:
            shift = cfg.flow_shift
            flow = 1.0 - np.linspace(1, 1 / T, num_inference_steps + 1)
            sig = np.flip(shift * flow / (1 + (shift - 1) * flow))[:-1].copy()
            ts = (sig * T).copy()
        else:
            sig = np.interp(ts, np.arange(0, len(train_sigmas)), train_sigmas)

        if cfg.final_sigmas_type == "sigma_min":
            ac0 = self.alphas_cumprod[0]
            last_sigma = ((1 - ac0) / ac0) ** 0.5
        else:
            last_sigma = 0
        sig = np.concatenate([sig, [last_sigma]]).astype(np.float32)

        self.sigmas = torch.from_numpy(sig)
        self.timesteps = torch.from_numpy(ts).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(ts)
        self.model_outputs = [None] * cfg.solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None
        self._set_host_schedule(self.timesteps, self.sigmas)

    def _set_host_schedule(self, timesteps: Tensor, sigmas: Tensor) -> None:
        self._timesteps_host = timesteps.detach().to("cpu")
        sig = sigmas.detach().to("cpu", torch.float32)
        values = sig.tolist()
        if values != getattr(self, "_sigma_values", None):
            self._coef_cache = {}  # coefficients depend on the sigmas only
        self._sigma_values = values
        self._sigmas_host = sig

    # ---- step index ------------------------------------------------------------------------------

    def index_for_timestep(self, timestep: Any, schedule_timesteps: Tensor | None = None) -> int:
        """Position of `timestep` in the schedule: the second match when it occurs twice, and,
        unlike the other schedulers, the last position when it does not occur (diffusers)."""
        if schedule_timesteps is None:
            schedule_timesteps = self._timesteps_host
        if isinstance(timestep, Tensor):
            timestep = timestep.to(schedule_timesteps.device)
        found = (schedule_timesteps == timestep).nonzero()
        if len(found) == 0:
            return len(self._timesteps_host) - 1
        return int(found[1 if len(found) > 1 else 0].item())

    def _init_step_index(self, timestep: Any) -> None:
        if self._begin_index is None:
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    # ---- coefficients ----------------------------------------------------------------------------

    def _coefficients(self, i: int, order: int) -> tuple[list[float], int]:
        """(coef, prediction_type) of the op for step i at `order`, from 0-dim float32 tensors of
        the host sigmas, each value computed by the same expression (order and association) as in
        diffusers' update; a minus sign in front of a term is folded into its coefficient
        (exact)."""
        key = (i, order)
        hit = self._coef_cache.get(key)
        if hit is not None:
            return hit
        cfg = self.config
        S = self._sigmas_host
        alpha_sigma = self._sigma_to_alpha_sigma_t

        def lam(a: Tensor, s: Tensor) -> Tensor:
            return torch.log(a) - torch.log(s)

        a_t, s_t = alpha_sigma(S[i + 1])
        a_0, s_0 = alpha_sigma(S[i])
        h = lam(a_t, s_t) - lam(a_0, s_0)
        c = [0.0] * 12
        plus = cfg.algorithm_type in ("dpmsolver++", "sde-dpmsolver++")
        pt = cfg.prediction_type

        # the model-output conversion (the op's x0 expression): data prediction for ++, noise
        # prediction for the original solver
        if plus:
            if pt == "epsilon":
                ptype, c[0], c[1] = PredictionType.EPSILON, a_0, s_0
            elif pt == "v_prediction":
                ptype, c[0], c[1] = PredictionType.V_PREDICTION, a_0, s_0
            elif pt == "flow_prediction":  # x - sigma * m; dividing by 1 is exact
                ptype, c[0], c[1] = PredictionType.EPSILON, 1.0, S[i]
            else:
                ptype = PredictionType.SAMPLE
        else:
            if pt == "epsilon":
                ptype = PredictionType.SAMPLE  # the noise prediction passes through unchanged
            elif pt == "sample":  # eps = (x - alpha * m) / sigma
                ptype, c[0], c[1] = PredictionType.EPSILON, s_0, a_0
            elif pt == "v_prediction":  # eps = alpha * m + sigma * x = sigma * x - (-alpha) * m
                ptype, c[0], c[1] = PredictionType.V_PREDICTION, s_0, -a_0
            else:
                raise ValueError(
                    f"{_OWNER}: prediction_type {pt!r} is not supported by "
                    f"algorithm_type {cfg.algorithm_type!r}"
                )

        if order >= 2:
            a_1, s_1 = alpha_sigma(S[i - 1])
            h_0 = lam(a_0, s_0) - lam(a_1, s_1)
            r0 = h_0 / h
            c[8] = 1.0 / r0
        if order == 3:
            a_2, s_2 = alpha_sigma(S[i - 2])
            h_1 = lam(a_1, s_1) - lam(a_2, s_2)
            r1 = h_1 / h
            c[9] = 1.0 / r1
            c[10] = r0 / (r0 + r1)
            c[11] = 1.0 / (r0 + r1)

        heun = cfg.solver_type == "heun"
        algo = cfg.algorithm_type
        if algo == "dpmsolver++":
            c[3] = s_t / s_0
            b0 = a_t * (torch.exp(-h) - 1.0)
            c[4] = -b0
            if order == 2:
                c[5] = a_t * ((torch.exp(-h) - 1.0) / h + 1.0) if heun else -(0.5 * b0)
            elif order == 3:
                c[5] = a_t * ((torch.exp(-h) - 1.0) / h + 1.0)
                c[6] = -(a_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5))
        elif algo == "sde-dpmsolver++":
            c[3] = s_t / s_0 * torch.exp(-h)
            b0 = a_t * (1 - torch.exp(-2.0 * h))
            c[4] = b0
            if order == 2:
                c[5] = a_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0) if heun else 0.5 * b0
            elif order == 3:
                c[5] = a_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)
                c[6] = a_t * ((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
            c[7] = s_t * torch.sqrt(1.0 - torch.exp(-2 * h))
        elif algo == "dpmsolver":
            c[3] = a_t / a_0
            b0 = s_t * (torch.exp(h) - 1.0)
            c[4] = -b0
            if order == 2:
                c[5] = -(s_t * ((torch.exp(h) - 1.0) / h - 1.0)) if heun else -(0.5 * b0)
            elif order == 3:
                c[5] = -(s_t * ((torch.exp(h) - 1.0) / h - 1.0))
                c[6] = -(s_t * ((torch.exp(h) - 1.0 - h) / h**2 - 0.5))
        else:  # sde-dpmsolver (orders 1 and 2)
            c[3] = a_t / a_0
            b0 = s_t * (torch.exp(h) - 1.0)
            c[4] = -(2.0 * b0)
            if order == 2:
                c[5] = -(2.0 * (s_t * ((torch.exp(h) - 1.0) / h - 1.0))) if heun else -b0
            c[7] = s_t * torch.sqrt(torch.exp(2 * h) - 1.0)

        result = ([float(v) for v in c], ptype)
        self._coef_cache[key] = result
        return result

    # ---- step ------------------------------------------------------------------------------------

    def scale_model_input(self, sample: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Identity (DPM-Solver's models take the sample unscaled)."""
        return sample

    def step(
        self,
        model_output: Tensor,
        timestep: int | Tensor,
        sample: Tensor,
        generator: torch.Generator | None = None,
        variance_noise: Tensor | None = None,
        return_dict: bool = True,
        guidance_scale: float | None = None,
        out: Tensor | None = None,
    ) -> SchedulerOutput | tuple:
        """One multistep DPM-Solver step from `timestep` to the next sigma (`out`: write the new
        sample there; it may be `sample`).

        model_output: the model's prediction (config.prediction_type), shaped like `sample`; with
        `guidance_scale=w`, unconditional and conditional predictions stacked along dim 0 (twice
        the batch), combined as u + w * (c - u) inside the fused step. The SDE variants use
        `variance_noise` if given, else noise drawn like diffusers (float32, the sample's shape,
        from `generator`). Returns `SchedulerOutput(prev_sample)` (diffusers' DPM-Solver output
        has no pred_original_sample), or `(prev_sample,)` with return_dict=False."""
        if self.num_inference_steps is None:
            raise ValueError(f"{_OWNER}.step: call set_timesteps before stepping")
        check_tensor(f"{_OWNER}.step", "model_output", model_output)
        check_tensor(f"{_OWNER}.step", "sample", sample)
        if variance_noise is not None:
            check_tensor(f"{_OWNER}.step", "variance_noise", variance_noise, step=False)
        if self._step_index is None:
            self._init_step_index(timestep)
        cfg = self.config
        i = self._step_index
        n = len(self._timesteps_host)
        # the warm-up (lower_order_nums) and final lower-order rules, as diffusers decides them
        final_first = i == n - 1 and (
            cfg.euler_at_final
            or (cfg.lower_order_final and n < 15)
            or cfg.final_sigmas_type == "zero"
        )
        final_second = i == n - 2 and cfg.lower_order_final and n < 15
        if cfg.solver_order == 1 or self.lower_order_nums < 1 or final_first:
            order = 1
        elif cfg.solver_order == 2 or self.lower_order_nums < 2 or final_second:
            order = 2
        else:
            order = 3
        coef, ptype = self._coefficients(i, order)

        plus = cfg.algorithm_type in ("dpmsolver++", "sde-dpmsolver++")
        m = model_output
        if cfg.variance_type in ("learned", "learned_range") and cfg.prediction_type == "epsilon":
            m = m[:, :3]  # diffusers keeps the first 3 channels (the noise) of such outputs

        noise = None
        if cfg.algorithm_type.startswith("sde"):
            if variance_noise is not None:
                noise = variance_noise.to(device=sample.device, dtype=torch.float32)
            else:
                noise = randn_like_diffusers(sample.shape, generator, sample.device, torch.float32)

        scale = None
        if cfg.thresholding and not plus:
            m = self._dpmsolver_thresholded_eps(m, sample, guidance_scale)
            ptype, guidance_scale = PredictionType.SAMPLE, None
        elif cfg.thresholding:
            x0 = self._eager_x0(m, sample, coef, ptype, guidance_scale)
            scale = threshold_scale(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)

        hist = [self.model_outputs[-1 - k] for k in range(order - 1)]
        prev, x0 = sampler_step(
            StepKind.DPM,
            sample,
            m,
            coef,
            prediction_type=ptype,
            history=hist,
            noise=noise,
            threshold_scale=scale,
            guidance_scale=guidance_scale,
            out=out,
        )
        self.model_outputs = self.model_outputs[1:] + [x0]
        if self.lower_order_nums < cfg.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        # diffusers returns the dtype of the converted model output
        passthrough = ptype == PredictionType.SAMPLE
        out_dtype = m.dtype if passthrough else torch.promote_types(sample.dtype, m.dtype)
        prev = prev.to(out_dtype)
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    @staticmethod
    def _guided(m: Tensor, guidance_scale: float | None) -> Tensor:
        m = m.to(torch.float32)
        if guidance_scale is None:
            return m
        u, c = m.chunk(2)
        return u + guidance_scale * (c - u)

    def _eager_x0(
        self, m: Tensor, sample: Tensor, coef: list[float], ptype: int, guidance_scale: float | None
    ) -> Tensor:
        """x0 before thresholding, by the op's own expression (eager_step's), for the quantile."""
        x = sample.to(torch.float32)
        m = self._guided(m, guidance_scale)
        if ptype == PredictionType.SAMPLE:
            return m
        if ptype == PredictionType.V_PREDICTION:
            return coef[0] * x - coef[1] * m
        # divide by a tensor on the sample's device: the kernels divide exactly (on CUDA a host
        # scalar divisor would turn into a multiplication by its reciprocal)
        return (x - coef[1] * m) / torch.tensor(coef[0], dtype=torch.float32, device=x.device)

    def _dpmsolver_thresholded_eps(
        self, m: Tensor, sample: Tensor, guidance_scale: float | None
    ) -> Tensor:
        """FALLBACK (plain PyTorch before the op) for algorithm_type dpmsolver / sde-dpmsolver
        with thresholding: diffusers converts the output to a noise prediction eps, derives x0,
        thresholds it and converts back, eps = (x - alpha * x0) / sigma. The op thresholds only
        its data prediction, so the thresholded eps is computed here and passed through the op
        unchanged (prediction_type "sample")."""
        i = self._step_index
        alpha, sigma = self._sigma_to_alpha_sigma_t(self._sigmas_host[i])
        alpha, sigma = float(alpha), float(sigma)
        x = sample.to(torch.float32)
        m = self._guided(m, guidance_scale)
        pt = self.config.prediction_type
        if pt == "epsilon":
            eps = m
        elif pt == "sample":
            eps = (x - alpha * m) / sigma
        else:
            eps = alpha * m + sigma * x
        x0 = (x - sigma * eps) / alpha
        s = threshold_scale(
            x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value
        )
        s = s.view(-1, *([1] * (x0.dim() - 1)))
        x0 = torch.clamp(x0, -s, s) / s
        return (x - alpha * x0) / sigma

    # ---- forward process -------------------------------------------------------------------------

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """alpha_t * x + sigma_t * noise at each row's timestep (looked up like diffusers: by
        value, or the step/begin index once a pipeline set one)."""
        check_tensor(f"{_OWNER}.add_noise", "original_samples", original_samples, step=False)
        check_tensor(f"{_OWNER}.add_noise", "noise", noise, step=False)
        sigma = self._row_sigmas(timesteps, original_samples)
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(sigma)
        return alpha_t * original_samples + sigma_t * noise

    def __len__(self) -> int:
        return self.config.num_train_timesteps
