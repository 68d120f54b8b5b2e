"""A deployed model as a model-stealing attacker sees it: a black-box query oracle (docs/methods.md,
Model stealing), and the stealing cost model of T-Tab 4.1.

`Oracle(model, output=..., budget=..., defense=OutputDefense(...))` wraps the owner's target (an
encoder or a classifier) and answers `oracle.query(x)` with what such a service returns:

* "embedding": the encoder's output (N, D), what an encoder-as-a-service returns (T section 4.2);
* "posterior": softmax of the classifier's logits (N, K);
* "label":     argmax of the logits (N,), int64.

It answers in eval mode and without gradient (the answer never requires grad, even for an input
that does), counts one query per image, and refuses with `QueryBudgetExceeded` a query that would
go past `budget` (nothing is answered or counted then). The owner's output defenses (T section
4.4.8) run on the owner's side, on every answer, in this order:

1. ReverseSigmoid (posteriors only; Lee et al. 2019, "Defending against NN model stealing attacks
   using deceptive perturbations", as ART's `ReverseSigmoid(beta, gamma)` documents it): with
   s the logistic sigmoid and s^-1(y) = log(y / (1 - y)), y clipped to [1e-9, 1 - 1e-9] inside s^-1,
       r  = beta * ( s(gamma * s^-1(y)) - 1/2 )
       y' = alpha * clip(y - r, 0, 1),   alpha = 1 / sum_k clip(y - r, 0, 1)_k   (renormalised)
   defaults beta = 1.0, gamma = 0.1 (ART's). It comes first because it needs a probability vector.
2. Gaussian noise z' = z + n, n ~ N(0, sigma^2 I) (T-Fig 4.23's "noise level" sigma), drawn from
   the oracle's own CPU generator seeded with `defense.seed` (a fixed sequence per oracle).
3. Top-k: keep the k largest entries of each answer, set the rest to 0.
4. Rounding to d decimal digits (last, so the released numbers have d digits).
Defenses act on embeddings and posteriors; a label oracle takes none.

The attacker never reaches the weights. The model lives only in a closure built by `__init__`; the
instance holds two functions and read-only metadata (no `nn.Module` among `vars(oracle)`), has no
`parameters()` / `state_dict()` / `model`, refuses unknown attributes and attribute assignment,
and refuses pickling and copying. Python cannot make this airtight (a caller who walks function
closures can reach anything); the barrier is against attack code that would use the weights by
accident or through an ordinary API, and tests/test_oracle.py checks those routes are closed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .config import require
from .errors import SecsweepError
from .ops.adversarial import eval_mode

__all__ = ["GPU_USD_PER_HOUR", "OUTPUTS", "USD_PER_1000_QUERIES", "Oracle", "OutputDefense",
           "QueryBudgetExceeded", "StealingCost", "costs", "reverse_sigmoid", "round_digits", "top_k"]

OUTPUTS = ("embedding", "posterior", "label")
RS_BETA = 1.0    # ReverseSigmoid magnitude, ART's default
RS_GAMMA = 0.1   # ReverseSigmoid convergence parameter, ART's default
_RS_CLIP = 1e-9  # keeps s^-1(y) finite at y in {0, 1} (ART clips the same way)


class QueryBudgetExceeded(SecsweepError):
    """A query would take the oracle past its query budget (one query per image)."""


@dataclass(frozen=True)
class OutputDefense:
    """The owner's output perturbations; all off by default (see the module docstring for order).

    noise_std: sigma of the additive Gaussian noise, in units of the answer (0 = off).
    top_k: keep the k largest entries per answer (None = off).
    round_digits: round to this many decimal digits (None = off).
    reverse_sigmoid: apply ReverseSigmoid(beta, gamma) to posteriors.
    seed: seed of the oracle's noise generator.
    """

    noise_std: float = 0.0
    top_k: int | None = None
    round_digits: int | None = None
    reverse_sigmoid: bool = False
    beta: float = RS_BETA
    gamma: float = RS_GAMMA
    seed: int = 0

    def __post_init__(self) -> None:
        require(isinstance(self.noise_std, (int, float)) and self.noise_std >= 0, "noise_std", self.noise_std,
                "must be a number >= 0 (Gaussian noise level sigma; 0 = off)")
        require(self.top_k is None or (isinstance(self.top_k, int) and self.top_k >= 1), "top_k", self.top_k,
                "must be None (off) or an integer >= 1")
        require(self.round_digits is None or (isinstance(self.round_digits, int) and self.round_digits >= 0),
                "round_digits", self.round_digits, "must be None (off) or an integer >= 0")
        require(isinstance(self.beta, (int, float)) and self.beta > 0, "beta", self.beta,
                "must be > 0 (ReverseSigmoid magnitude)")
        require(isinstance(self.gamma, (int, float)) and self.gamma > 0, "gamma", self.gamma,
                "must be > 0 (ReverseSigmoid convergence parameter)")
        require(isinstance(self.seed, int), "seed", self.seed, "must be an integer")

    @property
    def active(self) -> bool:
        return bool(self.noise_std > 0 or self.top_k is not None or self.round_digits is not None
                    or self.reverse_sigmoid)


def reverse_sigmoid(y: torch.Tensor, beta: float = RS_BETA, gamma: float = RS_GAMMA) -> torch.Tensor:
    """ReverseSigmoid of a batch of probability vectors y (N, K), K >= 2 (formula in the module docstring)."""
    if y.dim() != 2 or y.shape[1] < 2:
        raise ValueError(f"posterior shape={tuple(y.shape)}: ReverseSigmoid needs (N, K) probabilities, K >= 2")
    yc = y.clamp(_RS_CLIP, 1.0 - _RS_CLIP)
    r = beta * (torch.sigmoid(gamma * torch.log(yc / (1.0 - yc))) - 0.5)
    perturbed = (y - r).clamp(0.0, 1.0)
    return perturbed / perturbed.sum(dim=1, keepdim=True)


def top_k(z: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest entries of each row of z (N, D), zero the rest."""
    if k > z.shape[1]:
        raise ValueError(f"top_k={k}: must be <= the answer's dimension {z.shape[1]}")
    values, index = z.topk(k, dim=1)
    return torch.zeros_like(z).scatter(1, index, values)


def round_digits(z: torch.Tensor, digits: int) -> torch.Tensor:
    """Round to `digits` decimal digits (half to even, torch.round's rule)."""
    return torch.round(z, decimals=digits)


def _device_of(model: nn.Module) -> torch.device:
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


class Oracle:
    """Black-box access to a target model: `query(x)` answers, counts and defends (module docstring).

    Args:
        model: the owner's target, an encoder (output "embedding") or a classifier returning logits
            ("posterior", "label"); it stays on its own device.
        output: "embedding", "posterior" or "label".
        budget: the most queries (images) it answers in total; None = unlimited.
        defense: the owner's `OutputDefense`.
        batch_size: images per forward pass inside one query (memory only; answers do not depend on it
            except through the noise draws, which follow the answer's row order).
    """

    def __init__(self, model: nn.Module, output: str = "embedding", budget: int | None = None,
                 defense: OutputDefense = OutputDefense(), batch_size: int = 256) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model type={type(model).__name__}: must be a torch.nn.Module")
        require(output in OUTPUTS, "output", output, f"must be one of {', '.join(OUTPUTS)}")
        require(budget is None or (isinstance(budget, int) and budget >= 0), "budget", budget,
                "must be None (unlimited) or an integer >= 0 (queries = images)")
        require(isinstance(defense, OutputDefense), "defense", type(defense).__name__, "must be an OutputDefense")
        require(isinstance(batch_size, int) and batch_size >= 1, "batch_size", batch_size, "must be an integer >= 1")
        require(not (output == "label" and defense.active), "defense", defense,
                "output defenses act on embeddings and posteriors; a label oracle takes none")
        require(not (defense.reverse_sigmoid and output != "posterior"), "defense.reverse_sigmoid", True,
                "ReverseSigmoid perturbs posteriors; use output='posterior'")

        generator = torch.Generator().manual_seed(defense.seed)
        used = [0]

        def forward(x: torch.Tensor) -> torch.Tensor:
            out = model(x)
            if output == "label":
                return out.argmax(dim=1)
            out = out.flatten(1)
            return out.softmax(dim=1) if output == "posterior" else out

        def defend(z: torch.Tensor) -> torch.Tensor:
            if defense.reverse_sigmoid:
                z = reverse_sigmoid(z, defense.beta, defense.gamma)
            if defense.noise_std > 0:
                noise = torch.randn(z.shape, generator=generator, dtype=z.dtype) * defense.noise_std
                z = z + noise.to(z.device)
            if defense.top_k is not None:
                z = top_k(z, defense.top_k)
            if defense.round_digits is not None:
                z = round_digits(z, defense.round_digits)
            return z

        def answer(x: torch.Tensor, device: torch.device) -> torch.Tensor:
            n = int(x.shape[0])
            if budget is not None and used[0] + n > budget:
                raise QueryBudgetExceeded(f"budget={budget}: a query of {n} images would exceed it "
                                          f"({used[0]} used, {budget - used[0]} left)")
            target = _device_of(model)
            with torch.no_grad(), eval_mode(model):
                parts = [forward(chunk.to(target)) for chunk in x.detach().split(batch_size)]
                out = torch.cat(parts)
                if output != "label":
                    out = defend(out)
            used[0] += n
            return out.detach().to(device)

        def queries_used() -> int:
            return used[0]

        # the only state: two closures (the model is reachable from neither attribute nor method)
        object.__setattr__(self, "_Oracle__answer", answer)
        object.__setattr__(self, "_Oracle__used", queries_used)
        object.__setattr__(self, "_Oracle__info", (output, budget, defense))

    def query(self, x: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """The answers to a batch x (N, C, H, W), on `device` (default: x's device), never requiring grad."""
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] == 0:
            what = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x shape={what}: must be a non-empty batch (N, ...)")
        return self.__answer(x, torch.device(device) if device is not None else x.device)

    @property
    def output(self) -> str:
        return self.__info[0]

    @property
    def budget(self) -> int | None:
        return self.__info[1]

    @property
    def defense(self) -> OutputDefense:
        return self.__info[2]

    @property
    def queries_used(self) -> int:
        return self.__used()

    @property
    def remaining(self) -> int | None:
        """Queries left in the budget (None when unlimited)."""
        return None if self.budget is None else self.budget - self.queries_used

    def __getattr__(self, name: str) -> Any:
        # only reached for attributes that do not exist: say why instead of a bare AttributeError
        raise AttributeError(f"Oracle has no attribute {name!r}: it answers queries (query, queries_used, "
                             "budget, remaining, output, defense); the target model is not reachable")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Oracle is read-only (cannot set {name!r})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Oracle is read-only (cannot delete {name!r})")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("an Oracle cannot be pickled or copied: it would carry the target model")

    def __repr__(self) -> str:
        return (f"Oracle(output={self.output!r}, budget={self.budget}, queries_used={self.queries_used}, "
                f"defense={self.defense})")


GPU_USD_PER_HOUR = 2.934     # one NVIDIA A100 on Google Cloud (T-Tab 4.1)
USD_PER_1000_QUERIES = 1.0   # AWS Rekognition's price (T-Tab 4.1)


@dataclass(frozen=True)
class StealingCost:
    """T-Tab 4.1's comparison: the attack (surrogate training + queries) vs pre-training the target."""

    queries: int
    attack_device_hours: float
    target_device_hours: float
    training_usd: float   # attack_device_hours x $/GPU-hour
    query_usd: float      # queries / 1000 x $/1,000 queries
    attack_usd: float     # training_usd + query_usd
    target_usd: float     # target_device_hours x $/GPU-hour
    cost_ratio: float     # attack_usd / target_usd (NaN when the target's cost is 0)

    def metrics(self) -> dict[str, float]:
        """Flat metrics for a report (`queries` as a float like the rest)."""
        return {"queries": float(self.queries), "training_usd": self.training_usd, "query_usd": self.query_usd,
                "attack_usd": self.attack_usd, "target_usd": self.target_usd, "cost_ratio": self.cost_ratio,
                "target_device_hours": self.target_device_hours}


def costs(queries: int, device_hours: float, target_device_hours: float, *,
          usd_per_gpu_hour: float = GPU_USD_PER_HOUR,
          usd_per_1000_queries: float = USD_PER_1000_QUERIES) -> StealingCost:
    """The T-Tab 4.1 cost model: $ = device-hours x $/GPU-hour (+ queries x $/1,000 / 1,000 for the
    attack). Query time is not counted, as in T-Tab 4.1 (it is small next to training).

    Args:
        queries: images sent to the oracle (`Oracle.queries_used`).
        device_hours: the attack's device-hours (surrogate training).
        target_device_hours: the device-hours of pre-training the target.
    """
    require(isinstance(queries, int) and queries >= 0, "queries", queries, "must be an integer >= 0")
    require(device_hours >= 0, "device_hours", device_hours, "must be >= 0")
    require(target_device_hours >= 0, "target_device_hours", target_device_hours, "must be >= 0")
    require(usd_per_gpu_hour >= 0, "usd_per_gpu_hour", usd_per_gpu_hour, "must be >= 0")
    require(usd_per_1000_queries >= 0, "usd_per_1000_queries", usd_per_1000_queries, "must be >= 0")
    training = float(device_hours) * usd_per_gpu_hour
    query = queries / 1000.0 * usd_per_1000_queries
    target = float(target_device_hours) * usd_per_gpu_hour
    attack = training + query
    return StealingCost(queries=queries, attack_device_hours=float(device_hours),
                        target_device_hours=float(target_device_hours), training_usd=training, query_usd=query,
                        attack_usd=attack, target_usd=target,
                        cost_ratio=attack / target if target > 0 else float("nan"))
