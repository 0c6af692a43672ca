"""OPCM: orthogonal projection-based continual merging (Tang et al., arXiv 2501.09522), as
fusion_bench's ``opcm`` does it (fusion_bench/method/opcm/opcm.py, ``OPCMForCLIP``).

Each task is fine-tuned from the pretrained weights theta_0. The merge M starts as theta_1 (lambda_1
= 1, the norms' list [||tau_1||]); after task t > 1, with tau_t = theta_t - theta_0:

    for a linear layer's weight:  D = M - theta_0 = U S V^T  (full SVD)
        r = the first index where cumsum(S) / sum(S) > alpha          (0-based)
        P = U^T tau_t V;  P's diagonal and its top-left r x r block zeroed
        M <- theta_0 + lambda_{t-1} D + U P V^T
    every other parameter (norms, embeddings, biases):  M <- theta_0 + lambda_{t-1} (M - theta_0) + tau_t
    n = ||M - theta_0||,  avg = mean_{i <= t} ||tau_i||           (norms over every merged entry)
    lambda_t = n / avg;   M <- theta_0 + (M - theta_0) * avg / n   evaluated after task t

so the merged task vector always has the mean norm of the task vectors. alpha is 0.5
(config/method/opcm/opcm.yaml). The reference shuffles the order of its fine-tuned models
(``shuffle_order``); here the stream's order is the experiment, and it is kept.
"""

from __future__ import annotations

import math

import torch

from cl_bench.errors import check_number
from methods.shared.merging import MergingMethod, squared_norm


def linear_weight_names(model: torch.nn.Module) -> set[str]:
    """The names of the weights of ``model``'s ``nn.Linear`` layers, as ``named_parameters`` gives
    them (a weight tied to an embedding is named for the embedding, and is not one)."""
    linear = {f"{m}.weight" if m else "weight" for m, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    return {n for n, _ in model.named_parameters()} & linear


def project_out(merged: torch.Tensor, vector: torch.Tensor, alpha: float) -> torch.Tensor:
    """U P V^T, P = U^T ``vector`` V with its diagonal and its top-left r x r block zeroed, from the
    SVD of ``merged``. Every zeroed entry lies in the leading k x k block (k = min(rows, columns)),
    so with the thin SVD (U_k, V_k) it is ``vector`` - U_k (those entries of U_k^T vector V_k) V_k^T:
    the reference's full-matrices result without its rows x rows and columns x columns bases."""
    u, s, vh = torch.linalg.svd(merged, full_matrices=False, driver="gesvd" if merged.is_cuda else None)
    split = (s.cumsum(dim=0) / s.sum() > alpha).float().argmax().item()
    p = u.T @ vector @ vh.T
    zeroed = torch.eye(p.shape[0], dtype=torch.bool, device=p.device)
    zeroed[:split, :split] = True
    return vector - u @ (p * zeroed) @ vh


class OPCM(MergingMethod):
    name = "opcm"
    starts_from = "pretrained"
    per_entry = ("merged",)
    host_copies = 2  # theta_0 and M; a layer's SVD holds U, V and the projection

    def __init__(self, alpha: float = 0.5):
        super().__init__()
        self.alpha = float(check_number(alpha, "method.alpha", low=0, high=1))
        #: M, the running merge (empty before the first task)
        self.merged: dict[str, torch.Tensor] = {}
        #: ||tau_i|| of every task so far, and lambda_{t-1}
        self.norms: list[float] = []
        self.lambda_t = 1.0

    @torch.no_grad()
    def fold(self, module, views, params, tuned, vector, task, t):
        self.norms.append(math.sqrt(squared_norm(views, vector)))
        if not self.merged:
            self.merged = dict(tuned)  # theta_1 itself
            self.lambda_t = 1.0
            return self.merged
        linear = linear_weight_names(module.model)
        merged = {}
        for n, tau in vector.items():
            previous = self.merged[n] - self.pretrained[n]
            if n in linear and tau.dim() == 2:  # the SVD of the whole layer (FSDP: gathered), where it trains
                device = views.weight(params[n]).device
                d, tau_whole = (self.whole(views, {n: x}, cut=True)[n].to(device) for x in (previous, tau))
                cleaned = self.rows(views, params, {n: project_out(d, tau_whole, self.alpha).cpu()})[n]
            else:
                cleaned = tau
            merged[n] = self.pretrained[n] + (self.lambda_t * previous + cleaned)
        average = sum(self.norms) / len(self.norms)
        norm = math.sqrt(squared_norm(views, {n: m - self.pretrained[n] for n, m in merged.items()}))
        if norm == 0:  # no task moved the weights (the reference divides 0 by 0): theta_0, nothing to rescale
            self.lambda_t, self.merged = 1.0, merged
            return self.merged
        self.lambda_t = norm / average
        self.merged = {n: self.pretrained[n] + (m - self.pretrained[n]) * (average / norm) for n, m in merged.items()}
        return self.merged

    def planned_host(self, model, world, tasks):
        """Besides the state, a layer's merge holds the two whole task vectors of the layer, its thin
        U (out x k) and V (k x in), and the projection."""
        linear = linear_weight_names(model)
        largest = max(
            (4 * p.numel() + min(p.shape) * sum(p.shape) for n, p in model.named_parameters() if n in linear),
            default=0,
        )
        return {**super().planned_host(model, world, tasks), "merge pass: a layer's SVD (float32)": 4 * largest}

    def report(self):
        return {**super().report(), "lambda_t": self.lambda_t}

    def state_dict(self):
        return {**super().state_dict(), "norms": list(self.norms), "lambda_t": self.lambda_t}

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self.norms, self.lambda_t = list(state_dict["norms"]), float(state_dict["lambda_t"])
