"""Few-shot heads side by side at SLA size: forward+backward time, peak memory, and the SVM's dual accuracy.

Workload (the brief of issue 3): 8 episodes of 5-way 5-shot 15-query with rotation (M = 4), i.e. 20 joint
classes, 100 support and 300 query embeddings per episode, float32, feature sizes 640 (ResNet-12 pooled) and
16,000 (MetaOptNet's flattened ResNet-12 map). Embeddings are synthetic but shaped like real ones:
non-negative (post-ReLU), with class, transformation and per-image effects plus noise. Every head gets the
same embeddings (with an identity backbone) and the same loss, cross-entropy over the joint query labels;
one step is head forward + backward to the embeddings and head parameters.

- time: median over ``--repeats`` interleaved steps (heads alternate, so load on a shared machine hits all
  of them alike), with the ratio to the ProtoNet head measured in the same run;
- peak memory: the rise of the process's peak resident set size over one step (Linux: VmHWM of
  /proc/self/status, reset through /proc/self/clear_refs after the inputs are built), each head in a fresh
  process; it counts everything the step allocates (autograd graph, solver workspace), and also one-off
  allocator and thread-pool growth;
- SVM accuracy: relative gap of the dual objective of ``metaoptnet-svm`` (train-mode settings) to cvxpy
  (Clarabel, tight tolerances) on the first episode, and the solver's face solves per batch.

qpth's interior-point SVM (MetaOptNet's own head: the same QP, 15 iterations in training) joins when qpth is
importable; it is not a dependency of this project (it pins numpy < 2). Run from the repository root:

    python benchmarks/bench_heads.py                  # both feature sizes, 1 thread
    python benchmarks/bench_heads.py --dims 640 --repeats 11 --threads 2
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fewshot_sla.learners.svm_solver import dual_objective, solve_dual
from fewshot_sla.registry import LEARNERS

EPISODES, WAYS, ROTATIONS, SHOTS, QUERIES, COST = 8, 5, 4, 5, 15, 0.1
JOINT = WAYS * ROTATIONS

Head = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def sla_features(dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Support [B,100,dim], labels [B,100], query [B,300,dim], query labels [B,300] (joint labels y * M + j).

    Non-negative embeddings relu(class + rotation + image + noise), scaled so squared norms are about 70
    whatever ``dim``; rows are label-major and, within a class, sample-major over the rotations.
    """
    g = torch.Generator().manual_seed(seed)
    per_class = SHOTS + QUERIES
    cls = torch.randn(EPISODES, WAYS, 1, 1, dim, generator=g)
    rot = 0.7 * torch.randn(EPISODES, 1, 1, ROTATIONS, dim, generator=g)
    image = 0.8 * torch.randn(EPISODES, WAYS, per_class, 1, dim, generator=g)
    noise = 0.3 * torch.randn(EPISODES, WAYS, per_class, ROTATIONS, dim, generator=g)
    x = torch.relu(cls + rot + image + noise) * (8.0 / dim**0.5)
    y = (torch.arange(WAYS).view(-1, 1, 1) * ROTATIONS + torch.arange(ROTATIONS).view(1, 1, -1)).expand(
        EPISODES, WAYS, per_class, ROTATIONS
    )
    support = x[:, :, :SHOTS].reshape(EPISODES, -1, dim).contiguous()
    query = x[:, :, SHOTS:].reshape(EPISODES, -1, dim).contiguous()
    return support, y[:, :, :SHOTS].reshape(EPISODES, -1), query, y[:, :, SHOTS:].reshape(EPISODES, -1)


def qpth_svm_head() -> Head | None:
    """MetaOptNet's SVM-CS head on qpth (15 interior-point iterations), or None when qpth is not importable."""
    try:
        from qpth.qp import QPFunction
    except ImportError:
        return None
    scale = nn.Parameter(torch.ones(()))

    def head(support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, ways: int) -> torch.Tensor:
        b, s, _ = support.shape
        kernel = support @ support.transpose(1, 2)
        eye_ways = torch.eye(ways, dtype=kernel.dtype)
        hessian = torch.einsum("bij,kl->bikjl", kernel, eye_ways).reshape(b, s * ways, s * ways)
        hessian = hessian + torch.eye(s * ways, dtype=kernel.dtype)  # MetaOptNet's +1 on the dual Hessian
        onehot = F.one_hot(labels, ways).to(kernel.dtype).reshape(b, s * ways)
        inequality = torch.eye(s * ways, dtype=kernel.dtype).expand(b, -1, -1)
        equality = torch.kron(torch.eye(s, dtype=kernel.dtype), torch.ones(1, ways, dtype=kernel.dtype))
        equality = equality.expand(b, -1, -1)
        alpha = QPFunction(verbose=False, maxIter=15)(
            hessian, -onehot, inequality, COST * onehot, equality, torch.zeros(b, s, dtype=kernel.dtype)
        )
        return scale * (query @ (support.transpose(1, 2) @ alpha.view(b, s, ways)))

    return head


def make_heads(with_qpth: bool) -> dict[str, Head]:
    """Every head to compare, each as a function of embeddings; ProtoNet first (the baseline)."""
    heads: dict[str, Head] = {}
    for name in ("protonet", "metaoptnet-ridge", "metaoptnet-svm"):
        learner = LEARNERS.create(name, backbone=nn.Identity()).train()
        heads[name] = learner.head
    qpth = qpth_svm_head() if with_qpth else None
    if qpth is not None:
        heads["qpth-svm"] = qpth
    return heads


def step(head: Head, inputs: tuple[torch.Tensor, ...]) -> float:
    """Seconds of one forward + backward of ``head`` (fresh leaf embeddings, cross-entropy on the queries)."""
    support, labels, query, query_labels = inputs
    support = support.detach().requires_grad_()
    query = query.detach().requires_grad_()
    start = time.perf_counter()
    logits = head(support, labels, query, JOINT)
    F.cross_entropy(logits.flatten(0, 1), query_labels.flatten()).backward()
    return time.perf_counter() - start


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (e.g. VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_worker(name: str, dim: int, threads: int, queue: multiprocessing.Queue) -> None:
    """In a fresh process: build the inputs, reset the peak-RSS mark, run one step, report the peak's rise."""
    torch.set_num_threads(threads)
    inputs = sla_features(dim)
    head = make_heads(with_qpth=name == "qpth-svm")[name]
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # Linux: reset VmHWM to the current resident set size
    before = _status_bytes("VmRSS")
    step(head, inputs)
    queue.put(_status_bytes("VmHWM") - before)


def peak_memory(name: str, dim: int, threads: int) -> float:
    """Peak-RSS rise in bytes over one step of head ``name``, measured in a fresh spawned process."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_peak_worker, args=(name, dim, threads, queue))
    process.start()
    value = queue.get()
    process.join()
    return value


def svm_accuracy(inputs: tuple[torch.Tensor, ...]) -> str:
    """The SVM head's dual objective on episode 0 against cvxpy, plus its face solves on all episodes."""
    support, labels = inputs[0].double(), inputs[1]
    kernel = support @ support.transpose(1, 2)
    solution = solve_dual(kernel, labels, JOINT, COST, 1.0, max_iter=30)
    report = f"face solves {solution.iterations}, converged {int(solution.converged.sum())}/{EPISODES}"
    try:
        import cvxpy as cp
    except ImportError:
        return report + "; cvxpy not importable: no reference gap"
    k = kernel[0].numpy()
    onehot = np.eye(JOINT)[labels[0].numpy()]
    factor = np.linalg.cholesky(k + np.eye(k.shape[0]))
    alpha = cp.Variable(onehot.shape)
    objective = 0.5 * cp.sum_squares(factor.T @ alpha) - cp.sum(cp.multiply(onehot, alpha))
    problem = cp.Problem(cp.Minimize(objective), [alpha <= COST * onehot, cp.sum(alpha, axis=1) == 0])
    problem.solve(solver="CLARABEL", tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    ours = dual_objective(solution.alpha[:1], kernel[:1], labels[:1], 1.0).item()
    gap = (ours - problem.value) / abs(problem.value)
    return report + f"; dual objective {ours:.8g} vs cvxpy {problem.value:.8g} (episode 0): relative gap {gap:+.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[640, 16000])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: shared machine)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-head peak-memory processes")
    parser.add_argument("--no-qpth", action="store_true", help="leave qpth's SVM out even when importable")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    heads = make_heads(with_qpth=not args.no_qpth)
    print(
        f"{EPISODES} episodes of {WAYS}-way {SHOTS}-shot {QUERIES}-query x {ROTATIONS} rotations "
        f"({JOINT} joint classes, {WAYS * SHOTS * ROTATIONS} support, {WAYS * QUERIES * ROTATIONS} query), float32, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
        f"qpth {'included' if 'qpth-svm' in heads else 'not importable'}"
    )
    for dim in args.dims:
        inputs = sla_features(dim)
        times: dict[str, list[float]] = {name: [] for name in heads}
        for head in heads.values():
            step(head, inputs)  # warm-up
        for _ in range(args.repeats):
            for name, head in heads.items():
                if name == "qpth-svm" and times[name]:
                    continue  # one timed step: it takes minutes
                times[name].append(step(head, inputs))
        memory = {} if args.no_memory else {name: peak_memory(name, dim, args.threads) for name in heads}
        base_time = statistics.median(times["protonet"])
        print(f"\nfeatures {dim}:")
        print(f"{'head':18} {'fwd+bwd ms':>11} {'x protonet':>10} {'peak MiB':>9} {'x protonet':>10}")
        for name in heads:
            t = statistics.median(times[name])
            row = f"{name:18} {t * 1e3:11.2f} {t / base_time:10.2f}"
            if memory:
                row += f" {memory[name] / 2**20:9.1f} {memory[name] / max(memory['protonet'], 1):10.2f}"
            print(row)
        print("metaoptnet-svm: " + svm_accuracy(inputs))


if __name__ == "__main__":
    main()
