"""Model-agnostic meta-learning (Finn et al. 2017): second-order ``maml`` and first-order ``maml-fo``.

Per episode, the parameters theta are adapted on the support set by ``steps`` plain gradient steps
``theta <- theta - inner_lr * grad CE(support)`` (5 in training, 10 at test, inner_lr 0.01), and the query
logits come from the adapted parameters. The meta-gradient of the outer query loss flows back through the
inner loop (second order) or treats the inner gradients as constants (first order: the gradient of the
outer loss at the adapted parameters). The B episodes of a meta-batch share one meta-gradient: the
objective's mean of the outer losses.

Choices, stated:
- Head (``head``): ``"learned"`` (the default, Finn et al.'s MAML): a linear layer with one row per output,
  meta-learned with the backbone; weights Glorot-uniform and biases zero at start, as in Finn et al.'s code.
  Its size is the ways the learner first sees (N, or N*M for an SLA episode) and the backbone's
  ``feature_dim`` at that image size: it is materialised on the first call (a torch lazy parameter; the engine
  makes that call with the training ways before building the optimizer). Fewer ways later use its first rows;
  more are an error. ``"zero"``: every adaptation starts from an all-zero head of as many rows as the episode
  has ways, with no head parameter at all: the "zeroing trick" of Kao, Chiu & Chen, "MAML is a Noisy
  Contrastive Learner in Classification", ICLR 2022. (A single shared row repeated for every class, as this
  learner once had, receives exactly no meta-gradient: softmax cross-entropy ignores a shift common to all
  classes, so such a row is the zero head in disguise.)
- What adapts: ``adapt="all"`` (MAML: every backbone parameter and the head) or ``adapt="head"`` (only the
  head, as ANIL; the backbone still learns through the meta-gradient).
- BatchNorm: as in the original MAML, every BatchNorm layer of the backbone normalises with the statistics of
  the batch it sees (the support set in the inner loop, the query set for the logits), in training and at
  test alike (transductive). The learner removes the running statistics from the backbone's BatchNorm layers
  at construction.
- At test (``not self.training``) the learner still adapts (with gradients enabled, also under ``no_grad`` or
  ``inference_mode``) but keeps no second-order graph: logits are first-order in the meta-parameters.
- Episodes run one after the other (``episodes="loop"``, the default) or vectorised with ``torch.func.vmap``
  (``episodes="vmap"``; ``benchmarks/bench_maml.py`` compares them). vmap is refused for second-order
  adaptation of a backbone with BatchNorm: torch.func's batching rule for the BatchNorm double backward
  gives wrong meta-gradients there (checked against finite differences; pytorch/functorch#534).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.modules.lazy import LazyModuleMixin

from fewshot_sla.errors import UserError
from fewshot_sla.learners.base import Learner
from fewshot_sla.registry import LEARNERS

Params = dict[str, torch.Tensor]
ADAPT = ("all", "head")
HEADS = ("learned", "zero")
EPISODES = ("loop", "vmap")
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def use_batch_statistics(module: nn.Module) -> None:
    """Make every BatchNorm layer in ``module`` normalise with batch statistics, in train and eval mode."""
    for layer in module.modules():
        if isinstance(layer, BATCH_NORMS):
            layer.track_running_stats = False
            layer.running_mean = None
            layer.running_var = None
            layer.num_batches_tracked = None


def linear(features: torch.Tensor, head: Params) -> torch.Tensor:
    """[N, D] features -> [N, ways] logits with head weight [ways, D] and bias [ways]."""
    return features @ head["weight"].transpose(-1, -2) + head["bias"]


@LEARNERS.register("maml")
class MAML(LazyModuleMixin, Learner):
    """MAML over any backbone: per-episode gradient adaptation of the backbone and a linear head.

    Options: ``inner_lr`` (0.01), ``train_steps`` (5), ``test_steps`` (10), ``adapt`` ("all" | "head"),
    ``first_order`` (False), ``episodes`` ("loop" | "vmap"), ``head`` ("learned" | "zero").
    """

    episodes_independent = True  # each episode adapts on its own, BatchNorm statistics included
    # Adapted weights live in torch.func.functional_call only while the forward runs; a checkpointed stage would
    # be recomputed in backward with the module's own weights instead (measured: 1e-4 relative gradient errors).
    supports_checkpointing = False

    @property
    def preferred_micro_batch(self) -> int | None:
        """One episode per backward pass when looping: the loop then holds one episode's graph at a time."""
        return 1 if self.episodes == "loop" else None

    def __init__(
        self,
        backbone: nn.Module,
        inner_lr: float = 0.01,
        train_steps: int = 5,
        test_steps: int = 10,
        adapt: str = "all",
        first_order: bool = False,
        episodes: str = "loop",
        head: str = "learned",
    ) -> None:
        super().__init__(backbone)
        name = type(self).__name__
        if inner_lr < 0 or train_steps < 0 or test_steps < 0:
            raise UserError(f"{name}: inner_lr, train_steps and test_steps must be >= 0")
        if adapt not in ADAPT:
            raise UserError(f"{name}: unknown adapt '{adapt}'; choose one of: {', '.join(ADAPT)}")
        if head not in HEADS:
            raise UserError(f"{name}: unknown head '{head}'; choose one of: {', '.join(HEADS)}")
        if episodes not in EPISODES:
            raise UserError(f"{name}: unknown episodes '{episodes}'; choose one of: {', '.join(EPISODES)}")
        has_batch_norm = any(isinstance(m, BATCH_NORMS) for m in backbone.modules())
        if episodes == "vmap" and adapt == "all" and not first_order and has_batch_norm:
            raise UserError(
                f"{name}: episodes='vmap' gives wrong second-order gradients through BatchNorm (a torch.func "
                "batching-rule defect, pytorch/functorch#534); use episodes='loop' (the default) or maml-fo"
            )
        self.inner_lr = float(inner_lr)
        self.train_steps = int(train_steps)
        self.test_steps = int(test_steps)
        self.adapt = adapt
        self.first_order = first_order
        self.episodes = episodes
        use_batch_statistics(backbone)
        self.head = head
        self.label_equivariant = head != "learned"  # a learned head's row c starts class c's classifier
        if head == "learned":
            self.head_weight: nn.Parameter | nn.UninitializedParameter = nn.UninitializedParameter()
            self.head_bias: nn.Parameter | nn.UninitializedParameter = nn.UninitializedParameter()

    def initialize_parameters(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, ways: int
    ) -> None:
        """Materialise the learned head for ``ways`` outputs and the backbone's feature size at this image size:
        Glorot-uniform weights and zero biases, as Finn et al. initialise their output layer."""
        weight, bias = getattr(self, "head_weight", None), getattr(self, "head_bias", None)
        if not (isinstance(weight, nn.UninitializedParameter) and isinstance(bias, nn.UninitializedParameter)):
            return
        with torch.no_grad():
            weight.materialize((ways, self._feature_dim(support.shape[-1])))
            bias.materialize((ways,))
            nn.init.xavier_uniform_(self.head_weight)
            self.head_bias.zero_()

    def _feature_dim(self, image_size: int) -> int:
        feature_dim = getattr(self.backbone, "feature_dim", None)
        if not callable(feature_dim):
            raise TypeError("MAML's backbone needs feature_dim(image_size) -> int (the backbone contract)")
        return int(feature_dim(image_size))

    def _initial_head(self, ways: int, image_size: int, like: torch.Tensor) -> Params:
        """The head every adaptation starts from: the learned layer's first ``ways`` rows, or zeros."""
        if self.head == "zero":
            dim = self._feature_dim(image_size)
            # Leaves the inner loop differentiates (and adapts), not parameters: no meta-gradient reaches them.
            return {
                "weight": like.new_zeros(ways, dim).requires_grad_(),
                "bias": like.new_zeros(ways).requires_grad_(),
            }
        rows = self.head_weight.shape[0]
        if ways > rows:
            raise UserError(
                f"MAML's learned head has {rows} outputs (the ways it was trained on) but this episode has {ways}; "
                f"test with at most {rows} ways (SLA multiplies the ways by the copies), or use head='zero'"
            )
        return {"weight": self.head_weight[:ways], "bias": self.head_bias[:ways]}

    def forward(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, ways: int
    ) -> torch.Tensor:
        """[B,S,C,H,W], [B,S], [B,Q,C,H,W], ways -> query logits [B,Q,ways] of the adapted models."""
        self.initialize_parameters(support, support_labels, query, ways)
        steps = self.train_steps if self.training else self.test_steps
        second_order = self.training and not self.first_order
        keep_graph = torch.is_grad_enabled()
        with torch.inference_mode(False), torch.enable_grad():
            # Tensors made under inference_mode cannot enter autograd; plain copies can.
            inputs = (support, support_labels, query)
            support, support_labels, query = (t.clone() if t.is_inference() else t for t in inputs)

            def episode(s: torch.Tensor, y: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
                return self._episode(s, y, q, ways, steps, second_order, keep_graph)

            if self.episodes == "vmap":
                return vmap(episode, randomness="different")(support, support_labels, query)
            return torch.stack([episode(*e) for e in zip(support, support_labels, query)])

    def _episode(
        self,
        support: torch.Tensor,
        labels: torch.Tensor,
        query: torch.Tensor,
        ways: int,
        steps: int,
        second_order: bool,
        keep_graph: bool,
    ) -> torch.Tensor:
        """One episode: [S,C,H,W], [S], [Q,C,H,W] -> [Q, ways] logits after adaptation."""
        body: Params = dict(self.backbone.named_parameters())
        head = self._initial_head(ways, support.shape[-1], support)

        def features(params: Params, images: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = functional_call(self.backbone, params, (images,))
            return out

        if self.adapt == "head":
            support_features = features(body, support)
            head = self._adapt(
                head, lambda h: F.cross_entropy(linear(support_features, h), labels), steps, second_order
            )
            with torch.set_grad_enabled(keep_graph):
                return linear(features(body, query), head)

        adaptable = {f"body.{k}": v for k, v in body.items() if v.requires_grad}
        fixed = {k: v for k, v in body.items() if not v.requires_grad}

        def split(fast: Params) -> tuple[Params, Params]:
            """Flat adapted parameters -> (all backbone parameters, head parameters)."""
            adapted = {k[len("body.") :]: v for k, v in fast.items() if k.startswith("body.")}
            return {**fixed, **adapted}, {k[len("head.") :]: v for k, v in fast.items() if k.startswith("head.")}

        def support_loss(fast: Params) -> torch.Tensor:
            params, h = split(fast)
            return F.cross_entropy(linear(features(params, support), h), labels)

        fast = self._adapt(
            {**adaptable, "head.weight": head["weight"], "head.bias": head["bias"]}, support_loss, steps, second_order
        )
        params, head = split(fast)
        with torch.set_grad_enabled(keep_graph):
            return linear(features(params, query), head)

    def _adapt(self, fast: Params, loss_fn: Callable[[Params], torch.Tensor], steps: int, second_order: bool) -> Params:
        """``steps`` gradient steps on ``loss_fn``; first order treats the inner gradients as constants."""
        for _ in range(steps):
            if self.episodes == "vmap" and second_order:
                grads = grad(loss_fn)(fast)
            elif self.episodes == "vmap":
                # Detach the result too: a loss built on tensors outside ``fast`` (the support features
                # of adapt="head") would otherwise keep a graph to the meta-parameters.
                grads = {k: g.detach() for k, g in grad(loss_fn)({k: v.detach() for k, v in fast.items()}).items()}
            else:
                values = torch.autograd.grad(
                    loss_fn(fast), list(fast.values()), create_graph=second_order, materialize_grads=True
                )
                grads = dict(zip(fast, values))
            fast = {k: v - self.inner_lr * grads[k] for k, v in fast.items()}
        return fast


@LEARNERS.register("maml-fo")
class FirstOrderMAML(MAML):
    """First-order MAML (FOMAML): ``maml`` with ``first_order=True``; same options otherwise."""

    def __init__(self, backbone: nn.Module, **options: object) -> None:
        super().__init__(backbone, first_order=True, **options)  # type: ignore[arg-type]
