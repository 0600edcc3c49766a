"""SSL loss terms, one per module: fp32 numerics, distributed logic inside, safe in a single process."""

from training.losses.centering import SoftmaxCentering
from training.losses.dino_clstoken_loss import DINOLoss
from training.losses.ibot_patch_loss import IBOTPatchLoss
from training.losses.koleo_loss import KoLeoLoss
from training.losses.sinkhorn import sinkhorn_knopp

__all__ = ["DINOLoss", "IBOTPatchLoss", "KoLeoLoss", "SoftmaxCentering", "sinkhorn_knopp"]
