"""The study's outputs, made from its runs: tables (CSV, markdown), runs.json and plots.

Nothing here trains; `write_outputs` can re-make every file from the runs of a ``runs.json``.
"""

import csv
import json
import os

import matplotlib
import numpy as np

from topkast_jax.atomic import atomic_file

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

GROUP = ('method', 'forward_sparsity', 'backward_sparsity', 'update_every', 'structure')
MEANS = ('train_flops', 'inference_flops', 'steps_per_second', 'measured_sparsity')


def summarise(runs: list[dict], metric: str) -> list[dict]:
  groups = {}
  for r in runs:
    groups.setdefault(tuple(r.get(k, 'none') for k in GROUP), []).append(r)
  table = []
  for key, group in groups.items():
    values = np.array([r[metric] for r in group])
    row = dict(zip(GROUP, key), seeds=len(group), **{f'{metric}_mean': float(values.mean())})
    row[f'{metric}_std'] = float(values.std(ddof=1)) if len(group) > 1 else 0.0
    row.update({k: float(np.mean([r[k] for r in group])) for k in MEANS})
    if 'structured_share' in group[0]:
      row['structured_share'] = float(np.mean([r['structured_share'] for r in group]))
    table.append(row)
  return table


def write_csv(path: str, rows: list[dict]) -> None:
  fields = list(dict.fromkeys(k for r in rows for k in r if k != 'history'))
  with atomic_file(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fields, extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)


def markdown(table: list[dict], metric: str) -> str:
  percent = metric == 'test_accuracy'
  label = 'test accuracy (%)' if percent else 'test bits/char'
  structured = any(r['structure'] != 'none' for r in table)
  head = '| structure (share of weights) ' if structured else ''
  lines = [
    f'| method {head}| forward sparsity | backward sparsity | refresh every | {label} (mean +- '
    'std) | seeds | training FLOPs | inference FLOPs | steps/s | measured sparsity |',
    '|---|---|---|---|---|---|---|---|---|---|' + '---|' * structured,
  ]
  scale, digits = (100, 2) if percent else (1, 4)
  for r in table:
    topkast = r['method'] == 'topkast'
    kind = r['structure'] + (f' ({r["structured_share"]:.2f})' if 'structured_share' in r else '')
    lines.append(
      f'| {r["method"]} ' + (f'| {kind} ' if structured else '') + f'| {r["forward_sparsity"]:g} | '
      f'{r["backward_sparsity"] if topkast else "-"} | {r["update_every"] if topkast else "-"} | '
      f'{scale * r[metric + "_mean"]:.{digits}f} +- {scale * r[metric + "_std"]:.{digits}f} | '
      f'{r["seeds"]} | {r["train_flops"]:.3f}x | {r["inference_flops"]:.3f}x | '
      f'{r["steps_per_second"]:.0f} | {r["measured_sparsity"]:.4f} |'
    )
  return '\n'.join(lines) + '\n'


def structure_markdown(table: list[dict], metric: str) -> str:
  """The structure study as one row per method: each structure beside unstructured at its
  sparsity, mean +- std over seeds."""
  percent = metric == 'test_accuracy'
  scale, digits = (100, 2) if percent else (1, 4)
  columns = []  # (structure, sparsity), unstructured first at each sparsity
  for r in sorted(table, key=lambda r: (r['forward_sparsity'], r['structure'] != 'none')):
    if r['method'] != 'dense' and (r['structure'], r['forward_sparsity']) not in columns:
      columns.append((r['structure'], r['forward_sparsity']))
  label = lambda c: f'unstructured {c[1]:g}' if c[0] == 'none' else f'{c[0]} ({c[1]:g})'  # noqa: E731
  lines = [
    '| method | ' + ' | '.join(label(c) for c in columns) + ' |',
    '|---|' + '---|' * len(columns),
  ]
  cell = lambda r: (
    f'{scale * r[metric + "_mean"]:.{digits}f} +- {scale * r[metric + "_std"]:.{digits}f}'
  )  # noqa: E731
  for method in dict.fromkeys(r['method'] for r in table):
    rows = {(r['structure'], r['forward_sparsity']): r for r in table if r['method'] == method}
    if method == 'dense':
      lines.append(
        f'| dense | {cell(next(iter(rows.values())))} (every sparsity) |'
        + ' |' * (len(columns) - 1)
      )
      continue
    lines.append(
      f'| {method} | ' + ' | '.join(cell(rows[c]) if c in rows else '' for c in columns) + ' |'
    )
  return '\n'.join(lines) + '\n'


def _metric_plot(
  table: list[dict], metric: str, x: str, groups: dict, path: str, styles=None, **axes
) -> None:
  """Mean +- std of ``metric`` against ``x`` per group of rows (``styles``: matplotlib keywords
  per group), dense as a dashed line."""
  outside = len(groups) > 8  # a legend that would cover the lines goes to the right
  fig, ax = plt.subplots(figsize=(9 if outside else 6.4, 4.2))
  scale = 100 if metric == 'test_accuracy' else 1
  for r in table:
    if r['method'] == 'dense':
      ax.axhline(scale * r[metric + '_mean'], color='k', ls='--', label='dense')
  for label, rows in groups.items():
    rows = sorted(rows, key=lambda r: r[x])
    ax.errorbar(
      [r[x] for r in rows],
      [scale * r[metric + '_mean'] for r in rows],
      yerr=[scale * r[metric + '_std'] for r in rows],
      capsize=3,
      label=label,
      **{'marker': 'o', **(styles or {}).get(label, {})},
    )
  ax.set(ylabel='test accuracy (%)' if scale == 100 else 'test bits per character', **axes)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, **(dict(loc='center left', bbox_to_anchor=(1.01, 0.5)) if outside else {}))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_methods(table: list[dict], metric: str, task_name: str, path: str) -> None:
  """Metric against forward sparsity per method (the paper's Fig. 2)."""
  methods = dict.fromkeys(r['method'] for r in table if r['method'] != 'dense')
  groups = {m: [r for r in table if r['method'] == m] for m in methods}
  _metric_plot(table, metric, 'forward_sparsity', groups, path, xlabel='forward sparsity',
               title=task_name)  # fmt: skip


def plot_structures(table: list[dict], metric: str, task_name: str, path: str) -> None:
  """Metric against forward sparsity, one line per method and kind of structure (N:M, each
  block size, unstructured)."""
  groups, styles = {}, {}
  methods = list(dict.fromkeys(r['method'] for r in table if r['method'] != 'dense'))
  for r in table:
    if r['method'] != 'dense':
      kind = 'N:M' if ':' in r['structure'] else r['structure'].replace('none', 'unstructured')
      label = f'{r["method"]} {kind}'
      groups.setdefault(label, []).append(r)
      styles[label] = dict(
        color=f'C{methods.index(r["method"])}',
        ls={'unstructured': '-', 'N:M': '--'}.get(kind, ':'),
        marker={'unstructured': 'o', 'N:M': 's'}.get(kind, '^'),
      )
  _metric_plot(table, metric, 'forward_sparsity', groups, path, styles, xlabel='forward sparsity',
               title=f'{task_name}: structured against unstructured')  # fmt: skip


def plot_mask_dynamics(runs: list[dict], path: str) -> None:
  """Left: share of the forward mask new per logging interval, per sparse method at the
  middle sparsity; right: Top-KAST's share of weights that ever moved from C into A."""
  sparsities = sorted({r['forward_sparsity'] for r in runs if r['method'] != 'dense'})
  middle = sparsities[len(sparsities) // 2]
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))

  def mean_curve(group, key):
    points = [[(h['step'], h[key]) for h in r['history'] if key in h] for r in group]
    steps = [s for s, _ in points[0]]
    return steps, np.mean([[v for _, v in p] for p in points], axis=0)

  for method in dict.fromkeys(r['method'] for r in runs if r['method'] != 'dense'):
    group = [r for r in runs if r['method'] == method and r['forward_sparsity'] == middle]
    if not group:  # not run yet
      continue
    steps, change = mean_curve(group, 'mask_change')
    left.plot(steps, np.where(change > 0, change, np.nan), label=method)  # log: no zeros
  for s in sparsities:
    group = [r for r in runs if r['method'] == 'topkast' and r['forward_sparsity'] == s]
    if group:
      right.plot(*mean_curve(group, 'entered_from_c'), label=f'Top-KAST {s:g}')
  interval = runs[0]['history'][0]['step']
  left.set(yscale='log', xlabel='step', ylabel=f'share of the mask new per {interval} steps')
  left.set_title(f'forward mask changes at forward sparsity {middle:g}')
  right.set(xlabel='step', ylabel='share of weights ever moved from C into A')
  right.set_title('Top-KAST: exploration from C')
  for ax in (left, right):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_refresh(table: list[dict], metric: str, path: str) -> None:
  """Metric against the refresh interval, per (forward, backward) pair (the paper's Table 6)."""
  pair = lambda r: (r['forward_sparsity'], r['backward_sparsity'])  # noqa: E731
  groups = {}
  for r in table:
    if r['method'] != 'dense':
      groups.setdefault(f'Top-KAST {pair(r)[0]:g} / {pair(r)[1]:g}', []).append(r)
  _metric_plot(table, metric, 'update_every', groups, path, xscale='log',
               xlabel='refresh interval (steps)')  # fmt: skip


def write_outputs(out_dir: str, settings: dict, runs: list[dict], task, kept=()) -> list[dict]:
  """Tables and plots of ``runs``, and runs.json (with the ``settings`` that made them) and
  runs.csv of ``runs`` and the ``kept`` runs of earlier plans, each file replaced whole;
  returns the table."""
  table = summarise(runs, task.metric)
  out = lambda name: os.path.join(out_dir, name)  # noqa: E731
  every = [*kept, *runs]
  write_csv(out('runs.csv'), every)
  write_csv(out('table.csv'), table)
  with atomic_file(out('runs.json')) as f:
    json.dump({'flags': settings, 'runs': every}, f, indent=1, default=str)
  with atomic_file(out('table.md')) as f:
    f.write(markdown(table, task.metric))
  if settings['study'] == 'refresh':
    plot_refresh(table, task.metric, out('refresh_interval.png'))
  elif settings['study'] == 'structure':
    plot_structures(table, task.metric, task.title, out(f'{task.metric}_vs_structure.png'))
    with atomic_file(out('structure_table.md')) as f:
      f.write(structure_markdown(table, task.metric))
  else:
    plot_methods(table, task.metric, task.title, out(f'{task.metric}_vs_sparsity.png'))
    if any(r['method'] != 'dense' for r in runs):
      plot_mask_dynamics(runs, out('mask_dynamics.png'))
  return table
