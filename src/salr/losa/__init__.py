"""LoSA (Dynamic Low-Rank Sparse Adaptation, Huang et al., ICLR 2025) as a training method of salr.

- `config`: LoSAConfig and the schedules (sparsity per round, δ box, mean rank, steps and data per round);
- `allocate`: RMI (linear CKA) per-block sparsity and reconstruction-error rank allocation;
- `layer`: LoSALinear, the LoRA update masked by the base's sparsity (merging never fills a pruned position);
- `prune`: the calibration passes of a round (features, Wanda / SparseGPT block by block, errors);
- `loop`: the progressive prune / fine-tune rounds on salr's trainer (`train_losa`, `run_losa`), the merged export.
docs/losa.md says what is implemented and where it departs from the paper and the reference code.
"""

from salr.losa.config import LoSAConfig
from salr.losa.layer import LoSALinear
from salr.losa.loop import run_losa, save_merged, train_losa

__all__ = ["LoSAConfig", "LoSALinear", "run_losa", "save_merged", "train_losa"]
