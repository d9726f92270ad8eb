from . import register
from .dare import dare_option


@register("task_arithmetic")
def task_arithmetic(base, tau, **_):
    """Task Arithmetic (Ilharco et al. 2023): Delta = sum_i tau_i, scaled by alpha."""
    return tau.sum(1), {}


@register("dare_task_arithmetic", options=(dare_option(0.9),))
def dare_task_arithmetic(base, tau, **_):
    """DARE then Task Arithmetic (Yu et al. 2024): tau_i dropped at random and rescaled, then summed."""
    return tau.sum(1), {}
