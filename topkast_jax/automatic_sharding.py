"""Running a computation on a leaf sharded over explicit mesh axes with XLA's automatic
(GSPMD) partitioning inside, and choosing the sharding of the results.

Under ``jax.make_mesh``'s default explicit axes, every op must know its output sharding at
trace time; histograms, counts and index vectors built from a sharded leaf do not have an
obvious one. `call` runs such code with those axes automatic (``jax.sharding.auto_axes``), so
XLA picks the collectives (all-reduces of histograms and counts), and gives the results the
shardings asked for. Without explicit axes it is a plain call.
"""

import math

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def _explicit_axes(x) -> tuple[str, ...]:
  mesh = jax.typeof(x).sharding.mesh
  kinds = zip(mesh.axis_names, mesh.axis_types)
  return tuple(name for name, kind in kinds if kind == jax.sharding.AxisType.Explicit)


def spec_of(x) -> P:
  """The partition spec of ``x``'s type (``P()`` outside explicit meshes)."""
  return jax.typeof(x).sharding.spec if _explicit_axes(x) else P()


def out_spec(x) -> P | None:
  """``out_sharding`` for a new array shaped like ``x`` (random bits, say): ``x``'s spec under
  explicit axes, else None (let XLA choose)."""
  return jax.typeof(x).sharding.spec if _explicit_axes(x) else None


def spec_like(x, shape) -> P:
  """``x``'s spec for an array of ``shape`` (as many axes): each axis keeps ``x``'s mesh axes
  where they divide its new size, else is replicated."""
  if not _explicit_axes(x):
    return P()
  mesh = jax.typeof(x).sharding.mesh
  entries = []
  for entry, size in zip(spec_of(x), shape):
    axes = entry if isinstance(entry, tuple) else (entry,) if entry else ()
    entries.append(entry if size % math.prod(mesh.shape[a] for a in axes) == 0 else None)
  return P(*entries)


def vector_spec(x, length: int) -> P:
  """A spec for a vector of ``length`` derived from leaf ``x``: sharded over every mesh axis
  ``x`` is sharded over when they divide it evenly, else replicated."""
  axes = [
    a for entry in spec_of(x) if entry for a in (entry if isinstance(entry, tuple) else (entry,))
  ]
  if not axes:
    return P()
  mesh = jax.typeof(x).sharding.mesh
  shards = math.prod(mesh.shape[a] for a in axes)
  return P(tuple(axes)) if length % shards == 0 else P()


def call(fn, like, out_specs, *args):
  """``fn(*args)``; if ``like`` is sharded over explicit axes, with them automatic inside and
  the results sharded by ``out_specs`` (a pytree of ``PartitionSpec`` like the results)."""
  axes = _explicit_axes(like)
  if not axes:
    return fn(*args)
  return jax.sharding.auto_axes(fn, axes=axes, out_sharding=out_specs)(*args)


def automatic_mesh(tree):
  """The mesh of ``tree``'s leaves if all are concrete arrays sharded over one mesh of more
  than one device whose axes are all automatic, else None."""
  leaves = jax.tree.leaves(tree)
  if not leaves or any(
    isinstance(x, jax.core.Tracer) or not isinstance(getattr(x, 'sharding', None), NamedSharding)
    for x in leaves
  ):
    return None
  meshes = {x.sharding.mesh for x in leaves}
  mesh = meshes.pop()
  if meshes or mesh.size < 2:
    return None
  return mesh if all(k == jax.sharding.AxisType.Auto for k in mesh.axis_types) else None


def with_explicit_axes(fn, mesh, args):
  """``fn(*args)`` with ``mesh``'s axes explicit inside, each arg sharded as it is: results
  take the shardings their types get (as under an explicit mesh), not XLA's choice."""
  specs = jax.tree.map(lambda x: x.sharding.spec, args)
  with jax.set_mesh(mesh):
    inner = jax.sharding.explicit_axes(fn, axes=mesh.axis_names, in_sharding=specs)
    return jax.jit(inner)(*args)
