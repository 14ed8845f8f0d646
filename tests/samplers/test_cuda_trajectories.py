"""The DPM-Solver and flow-matching trajectories against diffusers' on CUDA, and no host sync
after a scheduler's first step (what CUDA-graph capture of the loop needs)."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is the reference (pip install diffusers)"
)
from genext.samplers.dpm_solver import DPMSolverMultistepScheduler  # noqa: E402
from genext.samplers.flow_match import FlowMatchEulerDiscreteScheduler  # noqa: E402

RefDPM = diffusers.DPMSolverMultistepScheduler
RefFlow = diffusers.FlowMatchEulerDiscreteScheduler

from trajectories import TOL_CUDA, both, compare_trajectories, guided_pair, initial_noise  # noqa: E402

# diffusers warns that the original "dpmsolver" algorithms are deprecated; that is its business
# and numpy 2 warns about how diffusers converts a tensor (np.array(tensor)); not ours either
pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]


# ---- CUDA ----------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("gen_device", ["cpu", "cuda"])
def test_cuda_trajectories_match_diffusers(gen_device):
    """The same comparisons on the GPU, both libraries on CUDA, at 1e-5 (diffusers' CUDA division
    by a host scalar multiplies by the reciprocal; the kernels divide exactly)."""
    for n in (10, 25):
        ours, ref = both(
            DPMSolverMultistepScheduler,
            RefDPM,
            algorithm_type="sde-dpmsolver++",
            solver_order=3,
            thresholding=True,
            sample_max_value=1.5,
        )
        compare_trajectories(
            ours, ref, n, device="cuda", tol=TOL_CUDA, guidance=7.5, gen_device=gen_device
        )
        ours, ref = both(
            DPMSolverMultistepScheduler,
            RefDPM,
            use_karras_sigmas=True,
            prediction_type="v_prediction",
        )
        compare_trajectories(
            ours, ref, n, kind="v_prediction", device="cuda", tol=TOL_CUDA, gen_device=gen_device
        )
        ours, ref = both(
            FlowMatchEulerDiscreteScheduler, RefFlow, shift=3.0, stochastic_sampling=True
        )
        compare_trajectories(
            ours, ref, n, kind="v", device="cuda", tol=TOL_CUDA, guidance=4.5, gen_device=gen_device
        )


@pytest.mark.cuda
def test_cuda_steps_after_the_first_do_not_sync():
    """No host-device synchronisation in a step once the step index is known (what CUDA-graph
    capture of the loop needs): the coefficients come from host copies of the schedule."""
    for make, kind in [
        (
            lambda: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=3),
            "epsilon",
        ),
        (lambda: FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True), "v"),
    ]:
        s = make()
        s.set_timesteps(10, device="cuda")
        host_t = s.timesteps.cpu()
        g = torch.Generator("cuda").manual_seed(0)
        x = initial_noise("cuda")
        x = s.step(
            guided_pair(x, host_t[0], kind), s.timesteps[0], x, generator=g, guidance_scale=5.0
        ).prev_sample
        torch.cuda.synchronize()
        outputs = [guided_pair(x, t, kind) for t in host_t]  # model stand-ins, made beforehand
        torch.cuda.set_sync_debug_mode("error")
        try:
            for k in range(1, len(host_t)):
                x = s.step(
                    outputs[k], s.timesteps[k], x, generator=g, guidance_scale=5.0
                ).prev_sample
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.isfinite(x).all()
