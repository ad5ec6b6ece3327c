"""Zeroth-order fine-tuning (MeZO and Sparse-MeZO): SPSA estimates from two forward passes.

- :mod:`qft.zo.spsa`: the math (seeded directions, perturbed forwards, the update), tensors in, tensors out;
- :mod:`qft.zo.optimizer`: ``ZoSGD``, a torch optimizer the Trainer's loop and LR schedulers drive;
- :mod:`qft.zo.trainer`: ``ZoTrainerMixin`` and ready classes for ``transformers.Trainer`` and TRL's
  ``SFTTrainer``, which replace ``training_step``/``create_optimizer`` and nothing else.
"""

from qft.zo.optimizer import ZoSGD
from qft.zo.spsa import apply_update_, direction, perturbed, perturb_inplace_

__all__ = ["ZoSGD", "apply_update_", "direction", "perturbed", "perturb_inplace_"]
