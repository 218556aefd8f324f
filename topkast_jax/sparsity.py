"""Which parameters are sparse, and at what forward and backward sparsity.

Resolution, per leaf of a parameter pytree (paths are keys joined by '/', for example
``params/Conv_0/kernel``):

1. ``sparsity=None``: every floating-point leaf with ndim >= 2 (kernels, embeddings) is sparse
   at the global sparsities; vectors and scalars (biases, norm scales) and empty leaves are
   dense.
2. ``sparsity`` a mapping ``{regex: value}``: the first regex (in mapping order) that
   ``re.search``-matches a path sets that leaf's value; other leaves follow rule 1. Every regex
   must match at least one leaf.
3. ``sparsity`` a callable ``fn(path, leaf) -> value``.

A value is ``True`` (sparse at the global sparsities), ``False`` or ``0`` (dense), a float
``s`` (forward sparsity ``s``; the backward density keeps the global ratio of backward to
forward density, capped at 1), or a pair ``(forward, backward)``. A forward sparsity of 0
means dense: the leaf gets no masks and no exploration penalty.

Structure (`topkast_jax.structure`): ``structure=`` of a method (default None, unstructured) is
the selection every sparse leaf gets; a value `NM` ``(n, m)`` or `Blocks` ``(rows, cols)``
makes one leaf sparse with that structure, and ``structured(structure, value)`` gives one leaf
a structure with any value above (None: unstructured, under a global structure). N:M fixes
the forward density to n / m: B keeps ``round((1 - backward) * m)`` per group (at least n),
with the backward density from the rule above; a float override cannot apply to an N:M leaf.
Blocks keep ``round((1 - s) * blocks)`` whole blocks per layer (A and B alike).

Stacked layers: a leaf whose leading axes index layers (flax ``nn.scan`` / ``nnx.scan`` stack a
(L, d_in, d_out) kernel) is declared with ``stacked(value, axes=1)``; each slice of the first
``axes`` axes is then one layer: its own top-k with exact counts, ERK on the slice's shape, the
baselines' drop and grow per slice. ``value`` is any value above; None applies rule 1 to the
slice (so a stack of biases, (L, d), stays dense). The shortcut for a whole scanned block:
``sparsity={'layers': stacked()}``. Without the declaration a 3-D leaf is one layer
(it may be a Conv1D or DenseGeneral kernel): its top-k is taken over the whole array.

``distribution`` spreads the global budget over the leaves left at the global sparsity:
``'uniform'`` gives each the same sparsity (the paper); ``'erk'`` (Erdos-Renyi-Kernel, as in
RigL, Evci et al. 2020) gives leaf l a density proportional to sum(shape_l) / prod(shape_l),
with the same total number of forward weights as uniform; leaves that would exceed density 1
become dense and the rest are rescaled.
"""

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from topkast_jax.structure import NM, Blocks, Structure, require


@dataclasses.dataclass(frozen=True)
class LeafSparsity:
  """Static sparsity of one sparse leaf (a pytree leaf itself: specs travel as a pytree)."""

  forward: float  # forward sparsity S: A holds round((1 - S) * layer size) entries per layer
  backward: float  # backward sparsity: B holds round((1 - backward) * layer size) per layer
  layer_axes: int = 0  # leading axes that index stacked layers (see `stacked`)
  structure: Structure = None  # N:M groups or blocks (`topkast_jax.structure`); None: any entries

  @property
  def forward_density(self) -> float:
    return 1.0 - self.forward

  @property
  def backward_density(self) -> float:
    return 1.0 - self.backward

  def counts(self, size: int) -> tuple[int, int]:
    """``(|A|, |B|)`` for a layer of ``size`` entries, rounding half up."""
    return _round_half_up(self.forward_density * size), _round_half_up(self.backward_density * size)

  def layer_shape(self, shape) -> tuple[int, ...]:
    return tuple(shape)[self.layer_axes :]

  def layer_counts(self, shape) -> tuple[int, int]:
    """``(|A|, |B|)`` of each layer of a leaf of ``shape`` (whole groups or blocks)."""
    layer = self.layer_shape(shape)
    if isinstance(self.structure, NM):
      groups = math.prod(layer) // self.structure.m
      return tuple(n * groups for n in self.group_counts())
    if isinstance(self.structure, Blocks):
      block = self.structure.rows * self.structure.cols
      return tuple(block * k for k in self.block_counts(shape))
    return self.counts(math.prod(layer))

  def group_counts(self) -> tuple[int, int]:
    """N:M: ``(n, n_B)``, the weights A and B keep of each group."""
    return self.structure.keep(self.forward_density), self.structure.keep(self.backward_density)

  def block_counts(self, shape) -> tuple[int, int]:
    """Blocks: ``(|A|, |B|)`` in blocks, per layer."""
    return self.counts(self.structure.count(self.layer_shape(shape)))

  def total_counts(self, shape) -> tuple[int, int]:
    """``(|A|, |B|)`` over the whole leaf: the per-layer counts times the number of layers."""
    layers = math.prod(tuple(shape)[: self.layer_axes])
    return tuple(layers * c for c in self.layer_counts(shape))


class Structured(NamedTuple):
  """A ``sparsity`` value selected with a structure (see `structured`)."""

  structure: Structure
  value: Any = True


def structured(structure: Structure, value=True) -> Structured:
  """A ``sparsity`` value (True, a float, a pair) for a leaf selected with ``structure``: an
  `NM`, `Blocks`, or None for unstructured under a method's global ``structure``."""
  require(structure)
  if isinstance(value, (Structured, NM, Blocks)) or value is None or value is False:
    raise ValueError(f'structured(structure, value): value must be sparse, got {value!r}.')
  return Structured(structure, value)


class Stacked(NamedTuple):
  """A ``sparsity`` value for a leaf whose first ``axes`` axes index layers (see `stacked`)."""

  value: Any = None
  axes: int = 1


def stacked(value=None, axes: int = 1) -> Stacked:
  """Declares stacked layers: ``value`` (as for any leaf; None: sparse if each slice has
  ndim >= 2) applies to each slice of the first ``axes`` axes, one layer each."""
  if isinstance(axes, bool) or not isinstance(axes, int) or axes < 1:
    raise ValueError(f'stacked(axes=...) must be an int >= 1, got {axes!r}.')
  if isinstance(value, Stacked):
    raise ValueError('stacked(...) cannot wrap another stacked(...).')
  return Stacked(value, axes)


def _round_half_up(x: float) -> int:
  # The tiny tolerance keeps 0.1 * 10 = 0.9999999999999998 from rounding down.
  return int(math.floor(x + 0.5 + 1e-9))


def path_name(path) -> str:
  """'/'-joined key path, e.g. ``params/Dense_0/kernel``.

  The ``.value`` attribute of a Flax NNX variable is left out: an NNX ``Param`` at
  ``Dense_0/kernel`` is named ``Dense_0/kernel``, as the same array in a plain dict.
  """
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.GetAttrKey) and key.name == 'value':
      continue
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return '/'.join(parts)


def check_sparsities(forward: float, backward: float, where: str = '') -> None:
  """Raises ValueError unless 0 <= backward <= forward < 1 (both Python numbers)."""
  suffix = f' for {where}' if where else ''
  for name, value in (('forward_sparsity', forward), ('backward_sparsity', backward)):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
      raise ValueError(
        f'{name}{suffix} must be a Python float, got {value!r}. Sparsities are static: with '
        "optax.inject_hyperparams pass static_args=('forward_sparsity', "
        "'backward_sparsity', 'update_every')."
      )
    if not 0.0 <= value < 1.0:
      raise ValueError(f'{name}{suffix} must be in [0, 1), got {value}.')
  if backward > forward:
    raise ValueError(
      f'backward_sparsity ({backward}) must not exceed forward_sparsity ({forward}){suffix}: '
      'the backward set B must contain the forward set A.'
    )


def check_step_count(name: str, value, least: int) -> None:
  """Raises ValueError unless ``value`` is a Python int in [least, 2**31) (an int32 count)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f'{name} must be a Python int, got {value!r}.')
  if not least <= value < 2**31:
    raise ValueError(f'{name} must be in [{least}, 2**31) (an int32 step count), got {value}.')


_Spec = bool | float | tuple[float, float] | NM | Blocks | Structured | Stacked
SparsitySpec = None | Mapping[str, _Spec] | Callable[[str, Any], _Spec]


def _backward_sparsity_at(density: float, forward: float, backward: float) -> float:
  """The backward sparsity of a leaf at forward ``density`` that keeps the global ratio of
  backward to forward density (capped at every weight)."""
  ratio = (1.0 - backward) / (1.0 - forward)
  return max(0.0, 1.0 - min(1.0, density * ratio))


def _explicit_value(value, path, forward, backward) -> LeafSparsity | None:
  """A user's per-leaf value as a LeafSparsity (None: dense; True: left to the distribution)."""
  if value is True:
    return None
  if value is False or value is None:
    return LeafSparsity(0.0, 0.0)
  if isinstance(value, tuple) and len(value) == 2:
    f, b = value
  elif isinstance(value, (int, float, np.floating, np.integer)):
    f = float(value)
    b = _backward_sparsity_at(1.0 - f, forward, backward)
  else:
    raise ValueError(
      f'sparsity value for {path!r} must be True, False, a float, a (forward, backward) '
      f'pair, NM(...), Blocks(...), structured(...) or stacked(...), got {value!r}.'
    )
  check_sparsities(f, b, where=repr(path))
  return LeafSparsity(float(f), float(b))


def where_structure_fits(structure: Structure, sparsity: SparsitySpec = None) -> Callable:
  """A ``sparsity`` callable: ``sparsity``'s value for each leaf (a mapping's first matching
  regex, or a callable's result), and ``structure`` on each leaf left sparse at the global
  sparsities that it tiles; the other sparse leaves stay unstructured, where a global
  ``structure=`` would raise. (For N:M, pass forward_sparsity = 1 - n / m.)"""
  require(structure, optional=False)  # None has nothing to fit

  def value(path, leaf):
    if isinstance(sparsity, Mapping):
      v = next((v for r, v in sparsity.items() if re.search(r, path)), None)
    else:
      v = sparsity(path, leaf) if callable(sparsity) else None
    if v is None:
      v = jnp.ndim(leaf) >= 2 and jnp.size(leaf) > 0
    if v is not True:
      return v
    try:
      structure.check(path, jnp.shape(leaf))
    except ValueError:
      return True
    return Structured(structure)

  return value


def _nm_value(value, structure: NM, path, forward, backward) -> LeafSparsity:
  """An N:M leaf's sparsities: forward 1 - n / m; B's share per group from ``value`` (a pair)
  or, for True, from the global backward-to-forward density ratio."""
  fixed = 1.0 - structure.n / structure.m
  if isinstance(value, tuple) and len(value) == 2 and abs(value[0] - fixed) < 1e-9:
    b = value[1]
  elif value is True:
    b = _backward_sparsity_at(1.0 - fixed, forward, backward)
  else:
    raise ValueError(
      f'sparsity value for {path!r}: N:M {structure} fixes the forward sparsity at {fixed:g}, '
      f'so its value must be True or a pair ({fixed:g}, backward), got {value!r}.'
    )
  check_sparsities(fixed, b, where=repr(path))
  return LeafSparsity(fixed, 1.0 - structure.keep(1.0 - b) / structure.m, structure=structure)


def _erk_densities(shapes: list[tuple[int, ...]], sizes, density: float) -> list[float]:
  """Erdos-Renyi-Kernel densities (scored on each layer's ``shapes``, leaves of ``sizes``
  entries) with the same total count as a uniform ``density``."""
  sizes = np.asarray(sizes, dtype=np.float64)
  scores = np.array([np.sum(s) / np.prod(s) for s in shapes], dtype=np.float64)
  budget = density * sizes.sum()
  dense = np.zeros(len(shapes), bool)
  while True:
    epsilon = (budget - sizes[dense].sum()) / (scores[~dense] * sizes[~dense]).sum()
    too_dense = ~dense & (epsilon * scores > 1.0)
    if not too_dense.any():
      return [1.0 if d else float(epsilon * s) for d, s in zip(dense, scores)]
    dense |= too_dense


def is_dense(spec) -> bool:
  """True at the dense positions (``optax.MaskedNode()``) of a spec or mask tree."""
  return isinstance(spec, optax.MaskedNode)


def _chosen_value(sparsity, patterns, name, leaf):
  """The user's value for one leaf (None: rule 1), and its layer axes."""
  if isinstance(sparsity, Mapping):
    value = next((sparsity[r] for r, p in patterns.items() if p.search(name)), None)
  elif callable(sparsity):
    value = sparsity(name, leaf)
  else:
    value = None
  axes = 0
  if isinstance(value, Stacked):
    value, axes = value
    if axes >= jnp.ndim(leaf):
      raise ValueError(
        f'parameter {name!r} of shape {jnp.shape(leaf)} is declared stacked over {axes} '
        'leading axes, which leaves no layer: give fewer axes, or mark it dense.'
      )
  default = jnp.ndim(leaf) - axes >= 2 and jnp.size(leaf) > 0  # rule 1, per layer
  return default if value is None else value, axes


def resolve_sparsities(
  params,
  forward_sparsity: float,
  backward_sparsity: float,
  sparsity: SparsitySpec = None,
  distribution: str = 'uniform',
  structure: Structure = None,
):
  """Per-leaf sparsities as a pytree like ``params``: a `LeafSparsity` at each sparse leaf,
  ``optax.MaskedNode()`` at dense ones. ``structure`` is every sparse leaf's selection unless
  its value sets one (see the module docstring).

  Raises:
    ValueError: for invalid sparsities, an unknown distribution, a regex that matches no leaf,
      a non-floating leaf marked sparse, a layer that would keep no weight, or a structure that
      does not fit a leaf (or, for N:M, the forward sparsity).
  """
  check_sparsities(forward_sparsity, backward_sparsity)
  if isinstance(require(structure), NM):
    if abs(forward_sparsity - (1.0 - structure.n / structure.m)) > 1e-9:
      raise ValueError(
        f'structure NM({structure.n}, {structure.m}) keeps {structure.n} of every '
        f'{structure.m} weights: forward sparsity {1 - structure.n / structure.m:g}, but '
        f'{forward_sparsity:g} was given. Pass forward_sparsity={1 - structure.n / structure.m:g}.'
      )
    if distribution != 'uniform':
      raise ValueError("an N:M structure fixes every leaf's density: use distribution='uniform'.")
  if distribution not in ('uniform', 'erk'):
    raise ValueError(f"distribution must be 'uniform' or 'erk', got {distribution!r}.")
  if sparsity is not None and not callable(sparsity) and not isinstance(sparsity, Mapping):
    raise ValueError(
      f'sparsity must be None, a mapping {{regex: value}} or a callable, got {sparsity!r}.'
    )
  leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  names = [path_name(p) for p, _ in leaves_with_paths]

  patterns = {}
  if isinstance(sparsity, Mapping):
    for regex in sparsity:
      try:
        patterns[regex] = re.compile(regex)
      except (re.error, TypeError) as e:
        raise ValueError(
          f'sparsity override {regex!r} is not a valid regular expression: {e}.'
        ) from e
    for regex, pattern in patterns.items():
      if not any(pattern.search(n) for n in names):
        shown = ', '.join(names[:20]) + (', ...' if len(names) > 20 else '')
        raise ValueError(f'sparsity override {regex!r} matches no parameter. Paths: {shown}.')

  explicit, layer_axes, structures = [], [], []
  for name, (_, leaf) in zip(names, leaves_with_paths):
    value, axes = _chosen_value(sparsity, patterns, name, leaf)
    chosen = structure
    if isinstance(value, (NM, Blocks)):
      chosen, value = value, True
    elif isinstance(value, Structured):
      chosen, value = value
    dense_value = value is None or value is False or (not isinstance(value, tuple) and value == 0)
    if isinstance(chosen, NM) and not dense_value:
      resolved = _nm_value(value, chosen, name, forward_sparsity, backward_sparsity)
    else:
      resolved = _explicit_value(value, name, forward_sparsity, backward_sparsity)
    if (resolved is None or resolved.forward > 0) and not jnp.issubdtype(
      jnp.result_type(leaf), jnp.floating
    ):
      raise ValueError(
        f'parameter {name!r} has dtype {jnp.result_type(leaf)} and cannot be '
        'sparse; mark it dense in `sparsity`.'
      )
    explicit.append(resolved)
    layer_axes.append(axes)
    structures.append(chosen)

  shapes = [tuple(int(d) for d in np.shape(leaf)) for _, leaf in leaves_with_paths]
  default = [i for i, e in enumerate(explicit) if e is None]
  result = list(explicit)
  if distribution == 'uniform' or not default:
    densities = [1.0 - forward_sparsity] * len(default)
  else:
    layers = [shapes[i][layer_axes[i] :] for i in default]
    densities = _erk_densities(
      layers, [math.prod(shapes[i]) for i in default], 1.0 - forward_sparsity
    )
  for i, d in zip(default, densities):
    result[i] = LeafSparsity(1.0 - d, _backward_sparsity_at(d, forward_sparsity, backward_sparsity))
  result = [
    dataclasses.replace(r, layer_axes=a, structure=c if r.forward > 0 else None)
    for r, a, c in zip(result, layer_axes, structures)
  ]
  for i, (name, shape, r) in enumerate(zip(names, shapes, result)):
    if r.structure is not None:
      r.structure.check(name, r.layer_shape(shape))
    if isinstance(r.structure, NM) and r.structure.axis >= 0:  # counted from the end: the
      # same axis of a layer and of its stacked leaf
      axis = r.structure.axis - len(r.layer_shape(shape))
      result[i] = r = dataclasses.replace(r, structure=dataclasses.replace(r.structure, axis=axis))
    size = math.prod(r.layer_shape(shape))
    if r.forward > 0 and r.layer_counts(shape)[0] == 0:
      unit = 'entries'
      if isinstance(r.structure, Blocks):
        size, unit = r.structure.count(r.layer_shape(shape)), str(r.structure)
      what = f'has layers of {size} {unit}' if r.layer_axes else f'has {size} {unit}'
      raise ValueError(
        f'parameter {name!r} {what}: at forward sparsity {r.forward:g} it would keep '
        f'round({r.forward_density:g} x {size}) = 0 weights and never train. Mark it dense '
        f'(sparsity={{{name!r}: False}}) or give it a lower sparsity.'
      )
  return treedef.unflatten([r if r.forward > 0 else optax.MaskedNode() for r in result])
