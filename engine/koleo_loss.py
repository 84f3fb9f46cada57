"""KoLeoLoss: the Kozachenko-Leonenko entropy regulariser of DINOv2 (Sablayrolles et al. 2019, "Spreading vectors
for similarity search"), a drop-in for dinov2's `KoLeoLoss` (facebookresearch/dinov2: dinov2/loss/koleo_loss.py):
-mean_i log(||x_i - x_nn(i)|| + eps) over the L2-normalised rows, nn(i) the nearest other row.

Same values and gradients as dinov2's in fp32. Fixed: the whole loss runs in fp32 whatever the input's dtype
(dinov2 only turns autocast off, so an fp16 input of a batch with a duplicated image gives log(0 + 1e-8 in fp16 =
0) = -inf), and a batch of fewer than two rows, which has no nearest neighbour, is a ValueError.
"""
import torch
import torch.nn.functional as F
from torch import nn

from fastdino.engine.vit import without_autocast


class KoLeoLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.pdist = nn.PairwiseDistance(2, eps=1e-8)

    @torch.no_grad()
    def pairwise_NNs_inner(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802 (dinov2's name)
        """Index of each L2-normalised row's nearest other row (largest inner product)."""
        dots = torch.mm(x, x.t())
        n = x.shape[0]
        dots.view(-1)[:: (n + 1)].fill_(-1)  # a row is not its own neighbour
        return torch.max(dots, dim=1).indices

    def forward(self, student_output: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """student_output (B, D), B >= 2 -> 0-d fp32 loss."""
        if student_output.ndim != 2 or student_output.shape[0] < 2:
            raise ValueError(f"student_output must be (B, D) with B >= 2 (a row needs a nearest neighbour), got "
                             f"shape {tuple(student_output.shape)}")
        with without_autocast(student_output.device):
            x = F.normalize(student_output.float(), eps=eps, p=2, dim=-1)
            neighbours = self.pairwise_NNs_inner(x)
            distances = self.pdist(x, x[neighbours])  # (B,)
            return -torch.log(distances + eps).mean()
