from . import register


@register("task_arithmetic")
def task_arithmetic(base, tau, **_):
    """Task Arithmetic (Ilharco et al. 2023): Delta = sum_i tau_i, scaled by alpha."""
    return tau.sum(1), {}
