"""PML's ``TripletMarginLoss(swap=True)`` against a reference set, with the right positive-negative distance."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import TripletMarginLoss
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu


def swap_triplet_loss(
    loss: TripletMarginLoss,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    indices_tuple: tuple,
    ref_emb: torch.Tensor,
    ref_labels: torch.Tensor,
) -> torch.Tensor:
    r"""What ``loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)`` means, for ``loss.swap`` True.

    With swap, a triplet :math:`(a, p, n)` uses the smaller of the anchor-negative and the
    positive-negative distances. Positive and negative both index ``ref_emb``, so the latter is the
    distance between two reference rows; PML 2.9 reads it from the (anchor, reference) matrix at row
    ``p``, which is another anchor's distance, or out of bounds once the reference set outgrows the
    batch (PML #748). Everything else is PML's: triplets from ``indices_tuple``, the distance, the
    margin, ``smooth_loss``, the embedding regulariser and the reducer.

    Shape:
        - embeddings: (B, D); labels: (B,); ref_emb: (R, D); ref_labels: (R,)
        - output: scalar
    """
    loss.reset_stats()
    distance = loss.distance
    anchors, positives, negatives = lmu.convert_to_triplets(
        indices_tuple, labels, ref_labels, t_per_anchor=loss.triplets_per_anchor
    )
    if len(anchors) == 0:
        loss_dict = loss.zero_losses()
    else:
        mat = distance(embeddings, ref_emb)
        ap, an = mat[anchors, positives], mat[anchors, negatives]
        pn = distance.pairwise_distance(
            distance.maybe_normalize(ref_emb[positives]), distance.maybe_normalize(ref_emb[negatives])
        )
        if distance.power != 1:
            pn = pn**distance.power
        violation = distance.margin(ap, distance.smallest_dist(an, pn)) + loss.margin
        losses = F.softplus(violation) if loss.smooth_loss else F.relu(violation)
        indices = (anchors, positives, negatives)
        loss_dict = {"loss": {"losses": losses, "indices": indices, "reduction_type": "triplet"}}
    loss.add_embedding_regularization_to_loss_dict(loss_dict, embeddings)
    return loss.reducer(loss_dict, embeddings, labels)
