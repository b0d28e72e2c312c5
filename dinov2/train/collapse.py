"""Is the DINO / iBOT objective alive? Statistics of the teacher's targets, and a monitor that says so.

A collapsed objective gives no learning signal: either the teacher maps every image to the same
bottleneck direction (mean pairwise cosine near 1), after which centering turns its outputs into
uniform targets, or the targets are uniform outright (entropy near ln K). Then every cross-entropy term
equals ln K whatever the student does. Per step and per objective (``dino`` on CLS tokens, ``ibot`` on
patch tokens) the teacher-side statistics are:

- ``<name>_target_entropy``: mean entropy of the target distributions divided by ln K (1 = uniform);
- ``<name>_bottleneck_cosine``: mean pairwise cosine of the teacher head's L2-normalised bottleneck
  outputs (1 = every input the same);
- ``<name>_prototypes_used``: distinct argmax prototypes over the batch.

``CollapseMonitor`` warns once (and can stop the run) when either of the first two stays above its
threshold for ``window`` consecutive iterations after ``grace`` iterations (at initialisation a ViT with
tiny LayerScale gives every image the same CLS token, so the first steps always look collapsed).
"""

import logging
import math

import torch

logger = logging.getLogger(__name__)


class CollapseError(RuntimeError):
    """The objective stayed collapsed for the monitor's window and ``monitor.stop`` is set."""


@torch.no_grad()
def target_statistics(name: str, bottleneck: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Teacher-side collapse statistics of one batch: ``bottleneck`` (N, d) L2-normalised, ``targets`` (N, K)."""
    n, n_prototypes = bottleneck.shape[0], targets.shape[-1]
    probabilities = targets.float().reshape(-1, n_prototypes)
    entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(-1).mean() / math.log(n_prototypes)
    summed = bottleneck.float().sum(0)
    # ||sum z||^2 = n + sum_{i != j} z_i . z_j for unit vectors
    cosine = (summed.dot(summed) - n) / max(n * (n - 1), 1)
    # marked in a (K,) vector rather than counted with unique(), whose output size would make the host
    # wait for the device in the middle of every step
    used = probabilities.new_zeros(n_prototypes).index_fill_(0, probabilities.argmax(-1), 1.0).sum()
    return {
        f"{name}_target_entropy": entropy,
        f"{name}_bottleneck_cosine": cosine,
        f"{name}_prototypes_used": used,
    }


class CollapseMonitor:
    """Counts consecutive collapsed iterations per objective; warns once per episode, stops if asked."""

    def __init__(self, window: int, entropy: float, cosine: float, grace: int, stop: bool):
        self.window, self.entropy, self.cosine, self.grace, self.stop = window, entropy, cosine, grace, stop
        self.streak: dict[str, int] = {}
        self.collapsed_iterations: dict[str, int] = {}
        self.warned: set[str] = set()

    def update(self, iteration: int, metrics: dict[str, float]) -> list[str]:
        """Feed one iteration's ``collapse/...`` statistics; returns the warnings raised at this iteration."""
        warnings = []
        for name in ("dino", "ibot"):
            entropy = metrics.get(f"collapse/{name}_target_entropy")
            cosine = metrics.get(f"collapse/{name}_bottleneck_cosine")
            if entropy is None or iteration <= self.grace:
                continue
            collapsed = entropy >= self.entropy or (cosine is not None and cosine >= self.cosine)
            self.streak[name] = self.streak.get(name, 0) + 1 if collapsed else 0
            self.collapsed_iterations[name] = self.collapsed_iterations.get(name, 0) + int(collapsed)
            if self.streak[name] == self.window and name not in self.warned:
                self.warned.add(name)
                message = (
                    f"the {name.upper()} objective has collapsed: for {self.window} iterations up to {iteration} the "
                    f"teacher's targets had entropy {entropy:.3f} of ln K (threshold {self.entropy}) and its "
                    f"bottleneck outputs a mean pairwise cosine of {cosine:.3f} (threshold {self.cosine}); "
                    "its loss gives the student no signal (see the train README on small-scale recipes)"
                )
                logger.warning(message)
                warnings.append(message)
                if self.stop:
                    raise CollapseError(message)
            if not collapsed:
                self.warned.discard(name)
        return warnings

    def summary(self) -> dict[str, float]:
        return {f"collapse/{name}_collapsed_iterations": float(n) for name, n in self.collapsed_iterations.items()}
