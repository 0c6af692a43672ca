"""TIES-merging (Yadav et al., NeurIPS 2023), merged after every task as fusion_bench's continual
version does (fusion_bench/method/opcm/ties_merging.py, with ties_merging_utils.py's ``ties_merging``).

Each task is fine-tuned from the pretrained weights theta_0; after task t, with M the running merge
(theta_0 before the first task):

    T_1 = tau_1,    T_t = TIES(M - theta_0, tau_t)   (t > 1: the merged vector and the new one)
    M  <- M + lambda * T_t                           evaluated after task t

TIES of task vectors (rows):
    trim    each row to its top ``density`` of magnitudes: over the whole model, every entry at or
            above the k-th smallest |x| kept, k = d - int(d * density) (``trim: model``, the authors'
            and fusion_bench's); or per tensor with peft's ``magnitude_based_pruning`` (``trim: tensor``)
    elect   each entry's sign: the sign of the trimmed rows' sum, a zero taking the majority of the
            elected signs over the whole model
    merge   the entries that agree with it: their sum (``merge: sum``, fusion_bench's continual
            default) or their mean (``merge: mean``, the authors' dis-mean: peft's ``disjoint_merge``)

lambda (``scaling``) 0.5 and density 0.2 (``threshold: 20``) are fusion_bench's
config/method/opcm/ties_merging.yaml.
"""

from __future__ import annotations

import torch
from peft.utils.merge_utils import disjoint_merge, magnitude_based_pruning

from cl_bench.errors import check_choice, check_number
from methods.base import trainable_bytes
from methods.shared.merging import MergingMethod

TRIMS = ("model", "tensor")
MERGES = ("sum", "mean")


def trim_over_model(row: dict[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """Every entry of ``row`` whose magnitude is at or above the k-th smallest over all of them
    (k = d - int(d * density)); the others zeroed."""
    if density >= 1:
        return row
    magnitudes = torch.cat([t.abs().flatten() for t in row.values()])
    d = magnitudes.numel()
    kth = magnitudes.kthvalue(d - int(d * density)).values
    return {n: t * (t.abs() >= kth) for n, t in row.items()}


def ties_merge(
    rows: list[dict[str, torch.Tensor]], density: float, trim: str = "model", merge: str = "sum"
) -> dict[str, torch.Tensor]:
    """TIES of the task vectors ``rows`` (whole tensors by name): trim, elect, disjoint merge."""
    if trim == "model":
        trimmed = [trim_over_model(r, density) for r in rows]
    else:
        trimmed = [{n: magnitude_based_pruning(t, density) for n, t in r.items()} for r in rows]
    stacked = {n: torch.stack([r[n] for r in trimmed]) for n in rows[0]}
    signs = {n: torch.sign(s.sum(dim=0)) for n, s in stacked.items()}
    majority = torch.sign(sum(s.double().sum() for s in signs.values()))
    out = {}
    for n, s in stacked.items():
        sign = signs[n]
        sign[sign == 0] = majority.to(sign.dtype)
        agree = torch.where(sign.unsqueeze(0) > 0, s > 0, s < 0)
        out[n] = disjoint_merge(s, agree) if merge == "mean" else (s * agree).sum(dim=0)
    return out


class TIES(MergingMethod):
    name = "ties"
    starts_from = "pretrained"
    per_entry = ("merged",)
    host_copies = 2  # theta_0 and M; a merge gathers the two task vectors whole (FSDP)

    def __init__(self, scaling: float = 0.5, density: float = 0.2, trim: str = "model", merge: str = "sum"):
        super().__init__()
        self.scaling = float(check_number(scaling, "method.scaling", low=0))
        self.density = float(check_number(density, "method.density", low=0, high=1, low_open=True))
        self.trim = check_choice(trim, TRIMS, "method.trim")
        self.merge_rule = check_choice(merge, MERGES, "method.merge")
        #: M, the running merge (empty before the first task)
        self.merged: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def fold(self, module, views, params, tuned, vector, task, t):
        if not self.merged:
            step, start = vector, self.pretrained
        else:
            rows = [{n: self.merged[n] - self.pretrained[n] for n in vector}, vector]
            whole = ties_merge([self.whole(views, r) for r in rows], self.density, self.trim, self.merge_rule)
            step, start = self.rows(views, params, whole), self.merged
        self.merged = {n: start[n] + self.scaling * step[n] for n in vector}
        return self.merged

    def planned_host(self, model, world, tasks):
        """Besides the state, a merge holds the two task vectors whole, trimmed and stacked."""
        return {
            **super().planned_host(model, world, tasks),
            "merge pass: 2 task vectors x 3": 6 * trainable_bytes(model, 4),
        }
