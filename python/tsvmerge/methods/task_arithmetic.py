from . import register, task_vectors


@register("task_arithmetic")
def task_arithmetic(base, finetuned, **_):
    """Task Arithmetic (Ilharco et al. 2023): Delta = sum_i tau_i, scaled by alpha."""
    return task_vectors(base, finetuned).sum(1), {}
