"""The run's losses, importable from here as before: the language-model loss lives in
``cpt_jax.core.losses`` (below the methods and the trainer), each method's own term with
its method."""

from cpt_jax.core.losses import ce_loss_sum, loss_mask, token_losses
from cpt_jax.methods.der import der_loss, topk_logits
from cpt_jax.methods.distill import kl_distill_loss

__all__ = ["ce_loss_sum", "der_loss", "kl_distill_loss", "loss_mask", "token_losses",
           "topk_logits"]
