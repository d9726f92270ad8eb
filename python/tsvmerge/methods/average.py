from . import register, task_vectors


@register("average")
def average(base, finetuned, **_):
    """Weight averaging: Delta = mean_i tau_i (alpha = 1 gives the mean of the fine-tunes)."""
    return task_vectors(base, finetuned).mean(1), {}
