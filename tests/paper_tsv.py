"""An independent, plain TSV-M written from DESIGN section 2 and the paper's public code:
one tensor at a time, full SVD, zero-padded factor blocks, running mean elsewhere."""
import torch


def paper_tsv_merge(base: dict, tasks: list, alpha=1.0, exclude=("text_projection",), dtype=torch.float64):
    T = len(tasks)
    out = {}
    for key, theta0 in base.items():
        if not theta0.is_floating_point():
            out[key] = theta0.clone()
            continue
        vecs = [t[key].to(dtype) - theta0.to(dtype) for t in tasks]
        r = min(theta0.shape) if theta0.dim() == 2 else 0
        if theta0.dim() == 2 and not any(p in key for p in exclude) and r // T > 0:
            k = r // T
            m, n = theta0.shape
            sum_u = torch.zeros(m, r, dtype=dtype)
            sum_s = torch.zeros(r, dtype=dtype)
            sum_v = torch.zeros(r, n, dtype=dtype)
            for i, vec in enumerate(vecs):
                u, s, vh = torch.linalg.svd(vec, full_matrices=False)
                sum_u[:, i * k:(i + 1) * k] = u[:, :k]
                sum_s[i * k:(i + 1) * k] = s[:k]
                sum_v[i * k:(i + 1) * k, :] = vh[:k, :]
            uu, _, vu = torch.linalg.svd(sum_u, full_matrices=False)
            uv, _, vv = torch.linalg.svd(sum_v, full_matrices=False)
            delta = torch.linalg.multi_dot((uu, vu, torch.diag(sum_s), uv, vv))
        else:
            delta = torch.zeros_like(vecs[0])
            for i, vec in enumerate(vecs):  # running mean, as the public code
                delta += (vec - delta) / (i + 1)
        out[key] = (theta0.to(dtype) + alpha * delta).to(theta0.dtype)
    return out
