"""Test-time adaptation: a fresh logistic-regression head per episode, episodes batched.

:func:`fit_logistic` minimizes, for every episode independently, exactly the objective of
scikit-learn's ``LogisticRegression(C=C, solver="lbfgs")`` (scikit-learn 1.9)::

    C * sum_i CE(W x_i + b, y_i) + 0.5 * ||W||_F^2          (intercept b unpenalized)

over the classes present in the episode's support set, so it can replace the per-episode
scikit-learn loop of the few-shot evaluation protocol (the paper's: C = 3).

How, and why this way
---------------------
A support set is tiny next to the feature size (S = 5..100 points, d = 640), and the L2
penalty keeps every optimal head in the span of the support points (representer
theorem), so each episode is solved in terms of its Gram matrix: the head is
``W = A X_c`` for a coefficient matrix A (K, S), X_c the support features centred (the
unpenalized intercept absorbs the shift), and the intercepts are folded into A through
the constant direction. The Gram matrix is the only O(S^2 d) step; everything after it
has support size and is batched over the episodes (in chunks, see _CHUNK_GRAM_CPU), with
no Python loop over them.
Where support rows outnumber the features more than twice (``eval --views`` fits 20-way
5-shot heads on 900 rows of 256-d features), the matrix is kept as its factor
``[X_c, sqrt(k) 1]``, (S, d + 1): a product then costs 2 (d + 1) a row instead of S,
and forming the matrix is saved (at 900 rows 1.16x faster on real features, whose CG
runs longer, 2.5x on synthetic ones: adapt_factor_real_cpu.json, adapt_factor_cpu.json).

The solver is Newton's method, which converges quadratically (four to six iterations
here, where L-BFGS in 640-d takes tens of iterations per episode, one episode at a time).
Each Newton step is solved by preconditioned conjugate gradients from Hessian-vector
products alone: the exact Hessian has K (S + 1) rows (130 for 5-way 5-shot), and
factoring 600 of them per iteration made a first version about 10x slower on a CPU.
The preconditioner replaces the points' softmax Hessians by their mean and K_c by a
multiple of the identity, which leaves K x K inverses per episode; it is exact at the
start, and a Newton step then takes one to five CG iterations (tens on tight 20-way
5-shot episodes). The CG vectors are carried
together with their products with the Gram matrix, so an iteration costs one small
batched product, and no factorization of the Gram matrix is needed (600 small
eigendecompositions cost about half of the whole fit on a CPU). Newton's gradient and
objective run in float64, the CG iterations in float32 (they stop at the forcing
tolerance, or where float32 rounding stalls them, with their best iterate: see _pcg; and
they are bound by memory traffic).

Details that keep it exact and robust:
- Inexact Newton with an Armijo backtracking line search on the (convex) objective:
  convergence does not depend on a good start, and early steps are solved loosely.
- The intercepts are defined only up to a shared constant (softmax is shift-invariant);
  the iterates never move along that direction, and the returned intercepts are centred
  (they sum to zero over the present classes), which is also what scikit-learn returns:
  L-BFGS starts at zero and every gradient it follows has zero intercept sum.
- Singular Gram matrices (duplicate support points, S > d) are fine: coefficients along
  their null space stand for a zero head and never show up in the products.
- A class absent from an episode's support has no finite optimum: the objective keeps
  falling as its intercept goes to minus infinity. Its limit is returned: zero weights and
  a ``-inf`` intercept, so it is never predicted and the other classes get exactly the
  model fitted on the present classes (what scikit-learn fits, as it only knows those).
- With exactly two classes present, scikit-learn fits a *binomial* model, one weight
  vector ``w`` with penalty ``0.5 ||w||^2``. That equals the two-class multinomial model
  at ``C / 2`` (the penalty is cheapest with ``W_1 = -W_0 = w / 2``), which is what is fitted
  then; ``weight[:, 1] - weight[:, 0]`` is scikit-learn's ``coef_[0]``.
- An episode with a single present class predicts it everywhere (zero weights).
- Float32 features keep float32 for the products with the feature dimension (the Gram
  matrix, the heads), which bounds the agreement with a float64 fit at about 1e-6.
- Only batched tensor operations, no host loop over episodes: the same code runs on CUDA.
  The fit is not differentiable (it runs under ``torch.no_grad``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import checks

__all__ = ["LogisticHeads", "fit_logistic"]

# Bytes of support features fitted at once; more episodes are fitted in chunks.
_CHUNK_BYTES = 1 << 28
# On a CPU also at most this many entries of Gram matrices (or their factors) a chunk:
# every episode of a chunk runs as many CG iterations as its slowest one needs (and
# Newton iterations until a quarter of them are done, see _Rows), and where those
# iterations cost (20-way 5-shot, or nine views an image) small chunks were 1.5-2.0x
# faster; cheap fits stay whole, as calls cost there (adapt_chunk_cpu.json). A GPU keeps
# the large chunks that fill it (not measured there).
_CHUNK_GRAM_CPU = 1 << 21
_MAX_HALVINGS = 40
# CG iterations without halving its best residual after which an episode's CG stops (at
# least 2 K for K classes; see _pcg).
_CG_PATIENCE = 20
# CG iterations run plain (the last iterate is the answer) before that bookkeeping starts:
# healthy solves end within them, and a stall's divergence comes far later (see _pcg).
_CG_PLAIN = 8
_ARMIJO = 1e-4
# Support rows per feature above which the Gram matrix is kept as its factor (_Factor):
# a product with it costs 2 (d + 1) a row then, against S (adapt_factor_cpu.json).
_FACTOR_ROWS = 2
# One point of the objective: (objective, softmax, penalty image, coef 1), see _evaluate.
_Point = tuple[Tensor, Tensor, Tensor, Tensor]
# The last Newton step: (coef, its image, step, its image, objective, slope), see _newton.
_Step = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


@dataclass(eq=False)
class LogisticHeads:
    """Linear heads, one per episode: ``logits = z @ weight^T + bias``.

    Attributes:
        weight: (E, n_classes, d) in the dtype of the support features.
        bias: (E, n_classes); centred over the classes present in each episode,
            ``-inf`` for classes absent from its support.
        n_iter: (E,) Newton iterations each episode took.
        converged: (E,) whether each episode reached the gradient tolerance.

    Example:
        >>> import torch
        >>> heads = fit_logistic(torch.randn(2, 4, 8), torch.tensor([[0, 0, 1, 1]] * 2))
        >>> heads.weight.shape, heads.logits(torch.randn(2, 3, 8)).shape
        (torch.Size([2, 2, 8]), torch.Size([2, 3, 2]))
    """

    weight: torch.Tensor
    bias: torch.Tensor
    n_iter: torch.Tensor
    converged: torch.Tensor

    def logits(self, z_query: torch.Tensor) -> torch.Tensor:
        """(E, Q, d) query features -> (E, Q, n_classes) logits."""
        return self._scores(z_query).transpose(1, 2)

    def predict(self, z_query: torch.Tensor) -> torch.Tensor:
        """(E, Q, d) query features -> (E, Q) predicted labels (int64)."""
        return self._scores(z_query).argmax(1)

    def _scores(self, z_query: Tensor) -> Tensor:
        """Logits laid out (E, n_classes, Q): with few classes, the product this way round
        runs about twice as fast on a CPU as (E, Q, d) @ (E, d, n_classes)."""
        if not isinstance(z_query, torch.Tensor) or z_query.dim() != 3:
            raise ValueError("z_query must be a 3-D tensor (E, Q, d), got "
                             f"{checks.describe(z_query)}")
        E, _, d = self.weight.shape
        if z_query.shape[0] != E or z_query.shape[2] != d:
            raise ValueError(f"z_query must have shape ({E}, Q, {d}) to match the heads "
                             f"(E={E} episodes, d={d} features), got {tuple(z_query.shape)}")
        if not z_query.is_floating_point():
            raise ValueError(f"z_query must be a floating-point tensor, got {z_query.dtype}")
        if not bool(torch.isfinite(z_query).all()):
            raise ValueError("z_query contains NaN or infinite values")
        dtype = torch.promote_types(z_query.dtype, self.weight.dtype)
        weight = self.weight.to(device=z_query.device, dtype=dtype)
        bias = self.bias.to(device=z_query.device, dtype=dtype)
        return torch.baddbmm(bias.unsqueeze(-1), weight, z_query.to(dtype).transpose(1, 2))


@torch.no_grad()
def fit_logistic(z_support: torch.Tensor, y_support: torch.Tensor, C: float = 3.0,
                 n_classes: int | None = None, max_iter: int = 100,
                 tol: float = 1e-7) -> LogisticHeads:
    """Fit scikit-learn's L2 multinomial logistic regression on many episodes at once.

    Args:
        z_support: (E, S, d) float support features, E episodes of S points.
        y_support: (E, S) integer labels in ``[0, n_classes)``.
        C: inverse regularization strength, as in scikit-learn (the paper: 3).
        n_classes: number of head rows; default ``y_support.max() + 1``.
        max_iter: Newton iterations at most.
        tol: stop once the gradient's Euclidean norm (over weights and intercepts) is at
            most ``tol`` in scikit-learn's units, the objective divided by ``C * S``
            (scikit-learn stops at a largest entry of 1e-4 by default); 1e-7 leaves the
            heads within about 1e-6 of the exact optimum, relative.

    Returns:
        :class:`LogisticHeads` with ``weight`` (E, n_classes, d) and ``bias``
        (E, n_classes); see the module docstring for absent classes and two-class episodes.

    Raises:
        ValueError: bad shapes, labels outside ``[0, n_classes)``, non-finite features, or
            a non-positive ``C``, ``tol`` or ``max_iter``.

    Example:
        >>> import torch
        >>> z = torch.randn(3, 10, 64)                  # 3 episodes, 5-way 2-shot
        >>> y = torch.arange(5).repeat_interleave(2).expand(3, -1)
        >>> heads = fit_logistic(z, y, C=3.0, n_classes=5)
        >>> heads.predict(z).shape, bool(heads.converged.all())
        (torch.Size([3, 10]), True)
    """
    checks.number("C", C)
    checks.number("tol", tol)
    checks.integer("max_iter", max_iter, 1)
    x, y, n_classes = _check_support(z_support, y_support, n_classes)
    E, S, d = x.shape
    chunk = max(1, _CHUNK_BYTES // (S * d * x.element_size()))
    if x.device.type == "cpu":
        entries = S * (d + 1 if _factored(S, d) else S)
        chunk = min(chunk, max(1, _CHUNK_GRAM_CPU // entries))
    parts = [_fit_chunk(x[lo:lo + chunk], y[lo:lo + chunk], float(C), n_classes,
                        int(max_iter), float(tol)) for lo in range(0, E, chunk)]
    weight, bias, n_iter, converged = (p[0] if len(p) == 1 else torch.cat(p)
                                       for p in zip(*parts, strict=True))
    return LogisticHeads(weight.to(z_support.dtype), bias.to(z_support.dtype), n_iter,
                         converged)


def _check_support(z: Tensor, y: Tensor,
                   n_classes: int | None) -> tuple[Tensor, Tensor, int]:
    if not isinstance(z, torch.Tensor) or z.dim() != 3:
        raise ValueError(f"z_support must be a 3-D tensor (E, S, d), got {checks.describe(z)}")
    if not z.is_floating_point():
        raise ValueError(f"z_support must be a floating-point tensor, got {z.dtype}")
    E, S, d = z.shape
    if E < 1 or S < 1 or d < 1:
        raise ValueError(f"z_support needs at least one episode, support point and feature, "
                         f"got shape {tuple(z.shape)}")
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"y_support must be a torch.Tensor, got {type(y).__name__}")
    if tuple(y.shape) != (E, S):
        raise ValueError(f"y_support must have shape ({E}, {S}) to match z_support, got "
                         f"{tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"y_support must hold integer labels, got dtype {y.dtype}")
    y = y.to(device=z.device, dtype=torch.int64)
    lo, hi = int(y.min()), int(y.max())
    if n_classes is None:
        n_classes = hi + 1
    else:
        checks.integer("n_classes", n_classes, 1)
    if lo < 0 or hi >= n_classes:
        raise ValueError(f"y_support labels must lie in [0, {n_classes}), got values in "
                         f"[{lo}, {hi}]")
    # Features stay in their own precision (at least float32) for the products with the
    # feature dimension; what has support size runs in float64 (CG aside, see _pcg).
    x = z if z.dtype == torch.float64 else z.to(torch.float32)
    return x, y, int(n_classes)


def _fit_chunk(x: Tensor, y: Tensor, C: float, n_classes: int, max_iter: int,
               tol: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    E, S, d = x.shape
    f64 = torch.float64
    onehot = torch.nn.functional.one_hot(y, n_classes).transpose(1, 2).to(f64)
    present = onehot.amax(2) > 0
    n_present = present.sum(1)
    # scikit-learn's binomial model for two classes is the multinomial one at C / 2.
    c = torch.full((E,), C, dtype=f64, device=x.device)
    c = torch.where(n_present == 2, 0.5 * c, c)
    gram_aug, row, mean, spread = _augmented_gram(x)
    coef, n_iter, converged = _newton(gram_aug, y.unsqueeze(1), onehot, present, c, spread,
                                      max_iter, tol)
    # W = coef X_c = (coef - coef 1 1^T / S) X; the intercept absorbs the shift: b - W mean.
    weight = (coef - coef.mean(-1, keepdim=True)).to(x.dtype) @ x
    bias = coef.mean(-1) * spread.unsqueeze(1)
    bias = bias - (coef @ (row - mean)).squeeze(-1)
    centre = torch.where(present, bias, 0.0).sum(1, keepdim=True) / n_present.unsqueeze(1)
    bias = torch.where(present, bias - centre, float("-inf"))
    # A head that is not finite is never reported as converged (callers count those); the
    # features are finite (checked above), so the coefficients tell, at support size.
    converged = converged & torch.isfinite(coef).all(2).all(1)
    return weight, bias, n_iter, converged


def _factored(S: int, d: int) -> bool:
    """Whether S support rows of d features keep their Gram matrix as its factor."""
    return S > _FACTOR_ROWS * (d + 1)


def _augmented_gram(x: Tensor) -> tuple[_Gram, Tensor, Tensor, Tensor]:
    """gram_aug = K_c + (spread / S) 1 1^T (see _newton), with G 1 / S (E, S, 1), its mean
    (E, 1, 1) and spread (E,), float64; as a matrix, or as its factor F (F F^T) where
    products with it cost less that way (:data:`_FACTOR_ROWS`)."""
    E, S, d = x.shape
    f64 = torch.float64
    factored = _factored(S, d)
    if factored:
        # In the features' precision, so an overflowing product shows as in G below.
        diag = (x * x).sum(2).to(f64)
        x64 = x.to(f64)
        xbar = x64.mean(1, keepdim=True)
        row = x64 @ xbar.transpose(1, 2)
        mean = (xbar * xbar).sum(2, keepdim=True)
    else:
        gram = x @ x.transpose(1, 2)
        gram = (gram + gram.transpose(1, 2)).to(f64) * 0.5
        diag = gram.diagonal(dim1=1, dim2=2)
        row = gram.mean(2, keepdim=True)
        mean = row.mean(1, keepdim=True)
    # A NaN or inf feature, or an overflowing product, shows on the diagonal.
    if not bool(torch.isfinite(diag).all()):
        raise ValueError("z_support contains NaN or infinite values (or values so large "
                         "that their products overflow)")
    # Centring the features moves only the unpenalized intercept, and takes the
    # intercept's coupling to the weights out of the Hessian at the start. On the Gram
    # matrix it costs nothing next to centring the features themselves:
    # K_c = G - row 1^T - 1 row^T + mean, with trace tr(G) - S mean.
    # The mean nonzero eigenvalue of K_c; any positive scale does where K_c vanishes
    # (identical support points), but not one so small that intercepts need huge A.
    spread = (diag.sum(1) - S * mean.view(E)) / max(min(S - 1, d), 1)
    spread = torch.maximum(spread, 1e-3 * diag.mean(1))
    spread = torch.where(spread > 0, spread, 1.0)
    # K_c + (spread / S) 1 1^T: its products give logits with the intercepts folded in
    # (see _newton); the constant direction gets an eigenvalue like the others.
    if factored:
        ones = (spread / S).sqrt()[:, None, None].expand(E, S, 1)
        return _Factor(torch.cat([x64 - xbar, ones], dim=2)), row, mean, spread
    return gram - row - row.transpose(1, 2) + (mean + (spread / S)[:, None, None]), row, \
        mean, spread


@dataclass(eq=False)
class _Factor:
    """A Gram matrix F F^T (R, S, S) kept as its factor F (R, S, r): a product with it then
    costs 2 r S instead of S^2 a row, and forming it S^2 r is saved (many support rows in
    few features, as nine views of each support image make)."""

    f: torch.Tensor

    def __getitem__(self, keep: Tensor) -> _Factor:
        return _Factor(self.f[keep])

    def to(self, dtype: torch.dtype) -> _Factor:
        return _Factor(self.f.to(dtype))


# A Gram matrix as a tensor (R, S, S), or as its factor.
_Gram = Tensor | _Factor


def _times(v: Tensor, gram: _Gram) -> Tensor:
    """v @ gram, batched: (R, K, S) @ (R, S, S), or in two products with a factor."""
    if isinstance(gram, _Factor):
        return torch.bmm(torch.bmm(v, gram.f), gram.f.transpose(1, 2))
    return torch.bmm(v, gram)


@dataclass(eq=False)
class _Rows:
    """The working tensors of :func:`_newton`, one row per episode still iterating.

    Finished rows are frozen, and dropped once they are a quarter of the rows: one slow
    episode should not make the batch pay for its iterations, nor each finished one for a
    copy of all the rows.
    """

    episode: torch.Tensor     # (R,) the row's episode in the chunk
    coef: torch.Tensor        # (R, K, S) the coefficients
    coef_img: torch.Tensor    # coef @ gram: the logits without the mask
    gram: _Gram               # (R, S, S) gram_aug, float64 (or its factor)
    gram32: _Gram             # the same in float32, for CG
    labels: torch.Tensor      # (R, 1, S)
    onehot: torch.Tensor      # (R, K, S)
    c: torch.Tensor           # (R,) inverse regularization strength
    k: torch.Tensor           # (R,) spread / S, the intercepts' weight
    threshold: torch.Tensor   # (R,) gradient norm at which a row has converged
    mask: torch.Tensor        # (R, K, 1) 0, or -inf for classes absent from the support
    fill: torch.Tensor        # (R, K, K) curvature on directions the iterates never take
    done: torch.Tensor        # (R,) frozen: converged, out of iterations or refused

    def select(self, keep: torch.Tensor) -> _Rows:
        """The rows where ``keep`` is True."""
        return _Rows(**{name: t[keep] for name, t in vars(self).items()})


def _newton(gram_aug: _Gram, labels: Tensor, onehot: Tensor, present: Tensor, c: Tensor,
            spread: Tensor, max_iter: int, tol: float) -> tuple[Tensor, Tensor, Tensor]:
    """Newton-CG on one coefficient matrix per episode, coef (E, K, S).

    With P1 = 1 1^T / S the projector on constants, P = I - P1 and k = spread / S, coef
    stands for the weights W = coef P X_c and the intercepts b = k coef 1, so the logits
    are coef @ gram_aug with gram_aug = K_c + k 1 1^T (as K_c 1 = 0), and
    sum(V1 * (V2 @ gram_aug)) = <W1, W2> + <b1, b2> / k is an inner product of the (W, b)
    they stand for. Each vector is carried with its image ``v @ gram_aug`` (suffix
    ``_img``), which gives logits and inner products without another product with the
    Gram matrix. In these terms the gradient is c (softmax - onehot) + coef P and the
    Hessian-vector product c H(v_img) + v P, H being each point's softmax Hessian.
    Returns (coef, iterations, converged) of every episode.
    """
    E, K, S = onehot.shape
    dev = onehot.device
    coef = torch.zeros(E, K, S, dtype=onehot.dtype, device=dev)
    n_iter = torch.zeros(E, dtype=torch.int64, device=dev)
    converged = torch.zeros(E, dtype=torch.bool, device=dev)
    rows = _first_rows(gram_aug, labels, onehot, present, c, spread, tol)
    gnorm0: Tensor | None = None
    last: _Step | None = None
    for it in range(max_iter + 1):
        point = _evaluate(rows.coef, rows.coef_img, rows.mask, rows.labels, rows.c, rows.k)
        if last is not None:
            # The Armijo test of the step just taken, at the point it led to.
            rows.coef, rows.coef_img, point, refused = _backtrack(
                last, rows.coef, rows.coef_img, point, rows.mask, rows.labels, rows.c, rows.k)
            refused &= ~rows.done
            if bool(refused.any()):
                # Rounding dominates the objective there: as good as it gets.
                gone = rows.episode[refused]
                coef[gone], n_iter[gone] = rows.coef[refused], it - 1
                rows.done = rows.done | refused
        f, prob, pen_img, csum = point
        grad2, gnorm = _gradient(rows, prob, pen_img, csum)
        if gnorm0 is None:
            gnorm0 = gnorm.clamp_min(torch.finfo(gnorm.dtype).tiny)
        ok = gnorm <= rows.threshold
        new = (ok | (it >= max_iter)) & ~rows.done
        if bool(new.any()):
            gone = rows.episode[new]
            coef[gone], converged[gone], n_iter[gone] = rows.coef[new], ok[new], it
            rows.done = rows.done | new
        n_done = int(rows.done.sum())
        if n_done == rows.done.numel():
            break
        if 4 * n_done >= rows.done.numel():
            keep = ~rows.done
            rows = rows.select(keep)
            gnorm0, gnorm, prob, f = (t[keep] for t in (gnorm0, gnorm, prob, f))
            grad2 = grad2[:, keep]
        # Inexact Newton: loose solves far from the optimum, tight ones near it.
        forcing = (gnorm / gnorm0).sqrt().clamp_max(0.5)
        step, step_img = _pcg(rows.gram32, rows.gram, prob, rows.fill, rows.c, rows.k, grad2,
                              (forcing * gnorm) ** 2, rows.done)
        last = (rows.coef, rows.coef_img, step, step_img, f,
                (grad2[0] * step_img).sum((1, 2)))
        rows.coef, rows.coef_img = rows.coef + step, rows.coef_img + step_img
    return coef, n_iter, converged


def _first_rows(gram_aug: _Gram, labels: Tensor, onehot: Tensor, present: Tensor,
                c: Tensor, spread: Tensor, tol: float) -> _Rows:
    E, K, S = onehot.shape
    dev = onehot.device
    coef = torch.zeros(E, K, S, dtype=onehot.dtype, device=dev)
    # Absent classes get a -inf logit, the limit the objective tends to (module docstring).
    mask = torch.where(present, 0.0, float("-inf")).unsqueeze(-1)
    # The iterates never move along the intercepts' common shift nor along absent classes;
    # any positive curvature there only keeps the preconditioner invertible.
    m = present.to(torch.float32)
    fill = torch.diag_embed(1.0 - m) + m.unsqueeze(2) * m.unsqueeze(1) / m.sum(1)[:, None, None]
    return _Rows(episode=torch.arange(E, device=dev), coef=coef,
                 coef_img=torch.zeros_like(coef), gram=gram_aug,
                 gram32=gram_aug.to(torch.float32), labels=labels, onehot=onehot, c=c,
                 k=spread / S, threshold=tol * c * S, mask=mask, fill=fill,
                 done=torch.zeros(E, dtype=torch.bool, device=dev))


def _gradient(rows: _Rows, prob: Tensor, pen_img: Tensor, csum: Tensor) -> tuple[Tensor, Tensor]:
    """The gradient and its image stacked (2, R, K, S), and its norm over (W, b)."""
    S = rows.coef.shape[-1]
    resid = prob - rows.onehot
    c3 = rows.c.view(-1, 1, 1)
    grad2 = torch.empty((2,) + rows.coef.shape, dtype=rows.coef.dtype, device=rows.coef.device)
    grad, grad_img = grad2.unbind(0)
    torch.addcmul(rows.coef - csum / S, c3, resid, out=grad)
    torch.addcmul(pen_img, c3, _times(resid, rows.gram), out=grad_img)
    # Euclidean over (W, b): the metric weighs the intercepts' part by k, not 1.
    grad_b2 = (rows.c.view(-1, 1) * resid.sum(-1)).square().sum(1)
    gnorm = ((grad * grad_img).sum((1, 2)) + (1 - rows.k) * grad_b2).clamp_min(0).sqrt()
    return grad2, gnorm


def _evaluate(co: Tensor, img: Tensor, mask: Tensor, lab: Tensor, c: Tensor, k: Tensor) -> _Point:
    """Objective, softmax, penalty image coef K_c and coef 1 at one point."""
    logits = img + mask
    top = logits.amax(1, keepdim=True)
    e = (logits - top).exp()
    total = e.sum(1, keepdim=True)
    ce = (top + total.log()).sum((1, 2)) - logits.gather(1, lab).sum((1, 2))
    csum = co.sum(-1, keepdim=True)
    pen_img = img - k.view(-1, 1, 1) * csum
    f = c * ce + 0.5 * (co * pen_img).sum((1, 2))
    return f, e / total, pen_img, csum


def _backtrack(last: _Step, co: Tensor, img: Tensor, point: _Point, mask: Tensor, lab: Tensor,
               c: Tensor, k: Tensor) -> tuple[Tensor, Tensor, _Point, Tensor]:
    """Armijo backtracking of the last Newton step (taken whole); returns the accepted
    point and where no step size passed (those stay where they were)."""
    co0, img0, step, step_img, f0, slope = last
    slack = 64 * torch.finfo(f0.dtype).eps * f0.abs()
    # Where the predicted decrease is below the objective's rounding, no test on the
    # objective can judge the step, and the point is that close to the optimum (convex):
    # the Newton step is taken as it is. Frozen episodes (zero steps) land here too.
    # (_pcg returns only descent steps; one uphill by rounding is tested, not taken whole.)
    sure = slope.abs() <= slack
    t = torch.ones_like(f0)
    for halvings in range(_MAX_HALVINGS + 1):
        accept = sure | (point[0] <= f0 + _ARMIJO * t * slope + slack)
        if bool(accept.all()):
            break
        t = torch.where(accept, t, 0.0 if halvings == _MAX_HALVINGS else 0.5 * t)
        # t = 0 gives back the start exactly, whatever the step holds.
        moved = t.view(-1, 1, 1) > 0
        co = torch.where(moved, torch.addcmul(co0, t.view(-1, 1, 1), step), co0)
        img = torch.where(moved, torch.addcmul(img0, t.view(-1, 1, 1), step_img), img0)
        point = _evaluate(co, img, mask, lab, c, k)
    return co, img, point, t == 0


def _pcg(gram32: _Gram, gram64: _Gram, prob: Tensor, fill: Tensor,
         c: Tensor, k: Tensor, grad2: Tensor, target2: Tensor,
         frozen: Tensor) -> tuple[Tensor, Tensor]:
    """Preconditioned CG for H step = -grad, towards ||residual||^2 <= target2; the best
    iterate (below) and its image. grad2 stacks the gradient and its image, (2, E, K, S);
    frozen episodes get a zero step (see :func:`_preconditioner` for the preconditioner).

    CG runs in float32: the step only has to be a descent direction solved to the forcing
    tolerance (the gradient and the line search stay in float64), and the iterations are
    bound by memory traffic, which float32 halves. Each vector and its image are stacked
    in one (2, E, K, S) tensor, to halve the number of calls.

    Float32 bounds how far the residual falls: on tight classes (20-way 5-shot) the Gram
    matrix is ill-conditioned, the residual stalls above a late Newton step's target, and
    the recurrence then diverges, to NaN. So each episode returns the iterate of smallest
    residual among the downhill ones (``<step, grad> < 0``: true of every CG iterate in
    exact arithmetic, checked as float32 loses it) from iteration ``_CG_PLAIN`` on
    (healthy solves end before it and pay nothing), and stops once its best residual
    has not halved for ``max(_CG_PATIENCE, 2 K)`` iterations or is not finite.
    """
    E, K, S = prob.shape
    f32 = torch.float32
    prob = prob.to(f32)
    c3 = c.to(f32)[:, None, None]
    k3 = k.to(f32)[:, None, None]
    precondition = _preconditioner(prob, fill, c3, k3)
    # Removes the mean (v P) from a vector, and k times its sum from its image.
    shift = torch.stack([torch.full_like(k3, 1.0 / S), k3])
    zero = prob.new_zeros(())
    x = torch.zeros_like(prob)
    r2 = grad2.to(f32).neg_()
    p2 = precondition(r2)
    rz = (r2[0] * p2[1]).sum((1, 2))
    live = (rz > 0) & ~frozen
    target2 = target2.to(f32)
    best: _BestIterate | None = None      # kept from _CG_PLAIN iterations on (see above)
    patience = max(_CG_PATIENCE, 2 * K)
    for it in range(K * S):
        hp2 = _hessian_product(p2, prob, c3, shift, gram32)
        # Solved episodes stop moving; so do those where rounding has eaten the curvature.
        curv = (p2[0] * hp2[1]).sum((1, 2))
        live = live & (curv > 0)
        alpha = torch.where(live, rz / curv, zero)[:, None, None]
        x.addcmul_(alpha, p2[0])
        r2.addcmul_(alpha, hp2, value=-1)
        res = (r2[0] * r2[1]).sum((1, 2)).abs()
        if it >= _CG_PLAIN - 1:
            best = best or _BestIterate.start(x, grad2[1], live)
            live = best.update(x, res, live, patience)
        live = live & (res > target2)
        if not bool(live.any()):
            break
        z2 = precondition(r2)
        rz_new = (r2[0] * z2[1]).sum((1, 2))
        beta = torch.where(live, rz_new / rz, zero)[:, None, None]
        rz = rz_new
        p2 = z2.addcmul_(beta, p2)
    # The image in float64: it updates the logits, which must stay those of the coefficients.
    x = (x if best is None else best.x).to(torch.float64)
    return x, _times(x, gram64)


@dataclass(eq=False)
class _BestIterate:
    """Each episode's best CG iterate so far, and how long since CG last made progress."""

    x: Tensor         # (E, K, S) the iterate of smallest residual among the downhill ones
    res: Tensor       # (E,) its residual; inf before the first
    anchor: Tensor    # (E,) the best residual when ``stale`` was last reset
    stale: Tensor     # (E,) iterations since the best residual last halved
    g_img: Tensor     # (E, K, S) the gradient's image, in x's dtype: <x, grad> < 0 is downhill

    @classmethod
    def start(cls, x: Tensor, g_img: Tensor, live: Tensor) -> _BestIterate:
        """Made only once a CG runs long, so healthy solves never pay for it. Episodes no
        longer ``live`` keep their iterate (a CG that has ended has its answer, as in a
        plain CG, and other episodes' long solves must not take it away); for the live
        ones none is kept yet: the first update takes the current iterate where it is
        eligible, and the start (zero) stays where it is not."""
        inf = torch.full(x.shape[:1], float("inf"), dtype=x.dtype, device=x.device)
        return cls(torch.where(live[:, None, None], 0.0, x), inf, inf.clone(),
                   torch.zeros_like(inf, dtype=torch.int64), g_img.to(x.dtype))

    def update(self, x: Tensor, res: Tensor, live: Tensor, patience: int) -> Tensor:
        """Take ``x`` where live and downhill with a smaller residual than the best (never
        for a NaN residual); returns ``live`` less the stalled and non-finite episodes."""
        better = live & ((x * self.g_img).sum((1, 2)) < 0) & (res < self.res)
        self.x = torch.where(better[:, None, None], x, self.x)
        self.res = torch.where(better, res, self.res)
        progress = better & (res < 0.5 * self.anchor)
        self.anchor = torch.where(progress, res, self.anchor)
        self.stale = torch.where(progress, 0, self.stale + 1)
        return live & torch.isfinite(res) & (self.stale < patience)


def _hessian_product(p2: Tensor, prob: Tensor, c3: Tensor, shift: Tensor,
                     gram32: _Gram) -> Tensor:
    """H p and its image for a direction p stacked with its image, (2, E, K, S)."""
    p, p_img = p2[0], p2[1]
    u = prob * p_img
    hz = torch.addcmul(u, prob, u.sum(1, keepdim=True), value=-1)
    hp2 = torch.addcmul(p2, shift, p.sum(-1, keepdim=True), value=-1)
    hp2[0].addcmul_(c3, hz)
    hp2[1].addcmul_(c3, _times(hz, gram32))
    return hp2


def _preconditioner(prob: Tensor, fill: Tensor, c3: Tensor,
                    k3: Tensor) -> Callable[[Tensor], Tensor]:
    """The CG preconditioner, as a function of a stacked (2, E, K, S) vector.

    It replaces every support point's softmax Hessian by their mean and K_c by a multiple
    of the identity, so it acts on the class side alone: one K x K matrix for the weights
    and one for the intercepts. It is exact at the start (uniform probabilities) for
    isotropic features, and needs a few iterations later on.
    """
    E, K, S = prob.shape
    f32 = prob.dtype
    mean_hess = torch.diag_embed(prob.sum(-1) / S) - (prob @ prob.transpose(1, 2)) / S + fill
    cs = c3 * k3 * S
    eye = torch.eye(K, dtype=f32, device=prob.device)
    # pre_w on the weight part v P, pre_b on the intercept part v P1 = (v 1 / S) 1^T;
    # both inverted in one call, and stacked twice, for a vector and its image.
    inv, _ = torch.linalg.inv_ex(torch.stack([torch.addcmul(eye, cs, mean_hess),
                                              cs * mean_hess]))
    pre_w, pre_b = inv.unbind(0)
    pre_w2 = pre_w.repeat(2, 1, 1)
    pre_diff2 = ((pre_b - pre_w) / S).repeat(2, 1, 1)

    def precondition(v2: Tensor) -> Tensor:
        flat = v2.view(2 * E, K, S)
        return torch.baddbmm(pre_diff2 @ flat.sum(-1, keepdim=True), pre_w2, flat).view(
            2, E, K, S)
    return precondition
