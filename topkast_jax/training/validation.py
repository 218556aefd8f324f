"""Checks of an experiment config and its workdir before anything is built or trained.

Defaults live in the config files only: the driver reads fields, never ``config.get(key,
default)``. Every field is checked here against the fields the task, model, optimizer and
schedule read, so a missing or misspelt field is an error that names it.
"""

import difflib
import json
import os
import re
import tempfile

from topkast_jax.methods import METHODS
from topkast_jax.training import classification

COMMON = set(
  'task dataset data_dir prepare_data model method sparsity optimizer schedule batch_size '
  'eval_batch_size num_train_steps log_every_steps eval_every_steps checkpoint_every_steps '
  'max_checkpoints num_devices sync_every_step seed'.split()
)
TASKS = {
  'image_classification': COMMON
  | {'image_size', 'half_precision', 'label_smoothing', 'num_epochs'},
  'language_modeling': COMMON | {'tgt_len', 'eval_tgt_len', 'eval_mem_len'},
}
DATASETS = {
  'image_classification': tuple(classification.NUM_CLASSES),
  'language_modeling': ('sotu', 'enwik8', 'wikitext103'),
}
RESNET = {'name', 'width', 'stem', 'zero_init_last_bn'}
TRANSFORMER_XL = set(
  'name n_layer d_model n_head d_head d_inner dropout dropatt pre_norm mem_len untie_r cutoffs '
  'div_val'.split()
)
MODELS = dict.fromkeys(classification.RESNETS, RESNET)
MODELS['transformer_xl'] = TRANSFORMER_XL
SPARSITY = set(
  'forward backward update_every exploration_l2 distribution structure mask_update_every drop_fraction '
  'begin_fraction end_fraction'.split()
)
OPTIMIZERS = {
  'sgd': {'name', 'momentum', 'nesterov', 'weight_decay', 'clip_norm'},
  'adam': {'name', 'b1', 'b2', 'weight_decay', 'clip_norm'},
}
SCHEDULES = {
  'stepwise': {'name', 'base_lr_per_256', 'warmup_epochs', 'decay_epochs'},
  'warmup_cosine': {'name', 'init_lr', 'peak_lr', 'warmup_steps', 'end_lr'},
}
MINIMUM = dict(batch_size=1, eval_batch_size=1, log_every_steps=1, max_checkpoints=1)
MINIMUM.update(eval_every_steps=0, checkpoint_every_steps=0, num_devices=0)


def _choice(field: str, value, allowed) -> None:
  if value not in allowed:
    raise ValueError(
      f'config.{field} = {value!r} is not known; use one of: {", ".join(map(str, allowed))}.'
    )


def _fields(prefix: str, section, expected: set) -> None:
  """Raises ValueError naming every missing and every unknown field of ``section``."""
  present = set(section.keys())
  problems = []
  for name in sorted(present - expected):
    close = difflib.get_close_matches(name, sorted(expected), n=1)
    hint = f' (did you mean {prefix}{close[0]}?)' if close else ''
    problems.append(f'unknown field {prefix}{name}{hint}')
  problems += [f'missing field {prefix}{name}' for name in sorted(expected - present)]
  if problems:
    raise ValueError('config: ' + '; '.join(problems) + '.')


def check_config(config) -> None:
  """Every field present and known, and every name (task, data set, model, ...) valid."""
  _choice('task', config.get('task'), tuple(TASKS))
  _fields('', config, TASKS[config.task])
  _choice('dataset', config.dataset, DATASETS[config.task])
  _choice('method', config.method, METHODS)
  for section, known in (('model', MODELS), ('optimizer', OPTIMIZERS), ('schedule', SCHEDULES)):
    _choice(f'{section}.name', config[section].get('name'), tuple(known))
    _fields(f'{section}.', config[section], known[config[section].name])
  if (config.model.name == 'transformer_xl') != (config.task == 'language_modeling'):
    raise ValueError(f'config.model.name = {config.model.name!r} is not a {config.task} model.')
  resnet = config.model.name.startswith('resnet')
  _fields('sparsity.', config.sparsity, SPARSITY | ({'dense_first_last'} if resnet else set()))
  lm = config.task == 'language_modeling'  # image runs may give num_epochs instead
  minimum = {**MINIMUM, 'num_train_steps': 1} if lm else MINIMUM
  for field, least in minimum.items():
    if not isinstance(config[field], int) or config[field] < least:
      raise ValueError(f'config.{field} must be an integer >= {least}, got {config[field]!r}.')


def check_layout(config, num_devices: int, process_count: int) -> None:
  """Both batch sizes split evenly over every device of every process."""
  devices = num_devices * process_count
  for field in ('batch_size', 'eval_batch_size'):
    if config[field] % devices:
      fits = config[field] - config[field] % devices or devices
      raise ValueError(
        f'config.{field} ({config[field]}) must be divisible by the number of devices '
        f'({process_count} process(es) x {num_devices} local devices = {devices}); set '
        f'--config.{field}={fits}, for example, or limit the devices with --config.num_devices.'
      )


def check_writable(workdir: str) -> None:
  """Creates ``workdir`` and proves it writable, before minutes of setup are spent."""
  try:
    os.makedirs(workdir, exist_ok=True)
    tempfile.TemporaryFile(dir=workdir).close()
  except OSError as e:
    raise ValueError(f'workdir {workdir!r} is not writable ({e}); pass another --workdir.') from e


def check_workdir(workdir: str) -> None:
  """`check_writable`, and refuses a run's workdir that holds files this project did not write
  (nothing in it is then touched)."""
  check_writable(workdir)
  foreign = foreign_files(workdir)
  if foreign:
    shown = ', '.join(foreign[:8]) + (', ...' if len(foreign) > 8 else '')
    raise ValueError(
      f'workdir {workdir!r} holds files this project did not write ({shown}); nothing was '
      'changed. Give the run an empty or new --workdir.'
    )


_OURS = re.compile(
  r'checkpoints|tensorboard|metrics\.jsonl|results\.json|\.lock|log_\d+\.txt|.*\.tmp'
)
# What a save writes in a step's folder (the items of `checkpoint.Checkpointer` and orbax's).
_CHECKPOINT_ITEMS = {
  'state',
  'run',
  'carry',
  'schedule',
  'checksums',
  '_CHECKPOINT_METADATA',
  'commit_success.txt',
}
_ROW_KEY = re.compile(r'(train|eval|sparsity)/.+')


def _our_rows(path: str) -> bool:
  """Whether every row of a metrics.jsonl is one the logger writes (a torn last line, from a
  crash mid-write, counts as ours: it is dropped on resume)."""
  with open(path, encoding='utf-8', errors='replace') as f:
    rows = f.read().split('\n')
  for row in rows[:-1]:
    try:
      values = json.loads(row)
    except ValueError:
      return False
    if not isinstance(values, dict) or not isinstance(values.get('step'), int):
      return False
    if not all(_ROW_KEY.fullmatch(k) for k in values if k != 'step'):
      return False
  return True


def _our_results(path: str) -> bool:
  try:
    with open(path, encoding='utf-8') as f:
      results = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(results, dict) and {'task', 'method', 'config'} <= results.keys()


def foreign_files(workdir: str) -> list[str]:
  """What in ``workdir`` this project did not write: names it never uses, checkpoint folders
  holding other files than a save writes, metrics rows and results of another shape."""
  foreign = [n for n in sorted(os.listdir(workdir)) if not _OURS.fullmatch(n)]
  checkpoints = os.path.join(workdir, 'checkpoints')
  if os.path.isdir(checkpoints):
    for name in sorted(os.listdir(checkpoints)):
      path = os.path.join(checkpoints, name)
      ours = re.fullmatch(r'unreadable_\d+_*|\d+\.orbax-checkpoint-tmp.*', name) or (
        name.isdigit() and os.path.isdir(path) and set(os.listdir(path)) <= _CHECKPOINT_ITEMS
      )
      if not ours:
        foreign.append(f'checkpoints/{name}')
  metrics = os.path.join(workdir, 'metrics.jsonl')
  if os.path.isfile(metrics) and not _our_rows(metrics):
    foreign.append('metrics.jsonl (rows the logger does not write)')
  results = os.path.join(workdir, 'results.json')
  if os.path.isfile(results) and not _our_results(results):
    foreign.append('results.json (not a run summary)')
  return foreign
