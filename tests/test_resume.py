"""Resume and reliability of the driver: bit-exact restarts for both tasks, refusal of a
different run, fallback from unreadable checkpoints, and config errors before training."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from experiment_utils import assert_same, last_checkpoint, tiny_config, xla_flags

from topkast_jax.training import checkpoint as checkpoint_lib
from topkast_jax.training import lock as lock_lib
from topkast_jax.training import validation
from topkast_jax.training.train import train_and_evaluate

pytestmark = pytest.mark.usefixtures('one_block_resnets')  # in-process runs; scripts run full depth
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ['resnet_fashion_mnist', 'transformer_xl_sotu']
_FINISHED = {}


def run_config(name, data_dir):
  """6 steps with checkpoints at 3 and 6; an evaluation at the end."""
  config = tiny_config(name, data_dir, steps=6)
  config.checkpoint_every_steps = 3
  return config


@pytest.fixture
def finished(data_dir, tmp_path_factory):
  """The workdir of an unbroken 6-step run of ``name`` (trained once per session)."""

  def get(name):
    if name not in _FINISHED:
      workdir = str(tmp_path_factory.mktemp('finished') / name)
      train_and_evaluate(run_config(name, data_dir), workdir)
      _FINISHED[name] = workdir
    return _FINISHED[name]

  return get


def copy_of(workdir, tmp_path):
  return shutil.copytree(workdir, tmp_path / 'copy')


def crash_before_last_checkpoint(name, data_dir, workdir, monkeypatch):
  """Runs until step 6 is done, then crashes before its checkpoint: the newest is step 3."""
  real_save = checkpoint_lib.Checkpointer.save

  def crash_at_6(self, step, *args):
    if step == 6:
      raise KeyboardInterrupt('simulated crash before the step-6 checkpoint')
    real_save(self, step, *args)

  with monkeypatch.context() as patch:
    patch.setattr(checkpoint_lib.Checkpointer, 'save', crash_at_6)
    with pytest.raises(KeyboardInterrupt):
      train_and_evaluate(run_config(name, data_dir), workdir)


@pytest.mark.parametrize('name', TASKS)
def test_resume_after_crash_is_bit_identical(
  name, data_dir, finished, tmp_path, monkeypatch, capsys
):
  crash_before_last_checkpoint(name, data_dir, str(tmp_path), monkeypatch)
  capsys.readouterr()
  results = train_and_evaluate(run_config(name, data_dir), str(tmp_path))

  assert results['resumed_from_step'] == 3
  assert 'resumed from step 3' in capsys.readouterr().out
  items = ('state', 'carry') if name.startswith('transformer') else ('state',)
  straight, resumed = (last_checkpoint(w, items) for w in (finished(name), str(tmp_path)))
  assert_same(straight, resumed)  # parameters, optimizer state, masks (and memories)
  if 'carry' in items:
    assert resumed['carry'].shape == (2, 8, 8, 32)  # [layers, rows, mem_len, d_model]
    assert np.abs(resumed['carry']).sum() > 0
  rows = [json.loads(r) for r in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  train_steps = [r['step'] for r in rows if 'train/loss' in r]
  assert train_steps == [1, 2, 3, 4, 5, 6]  # the replayed steps once, not twice


def test_lm_resume_without_saved_memories_would_differ(data_dir, finished, tmp_path, monkeypatch):
  """The memories matter: restarting them empty (the old behaviour) changes the result."""
  crash_before_last_checkpoint('transformer_xl_sotu', data_dir, str(tmp_path), monkeypatch)
  from topkast_jax.training.language_modeling import LanguageModeling

  monkeypatch.setattr(
    LanguageModeling, 'carry_from_checkpoint', lambda self, _: self.initial_carry()
  )
  train_and_evaluate(run_config('transformer_xl_sotu', data_dir), str(tmp_path))
  straight = last_checkpoint(finished('transformer_xl_sotu'))['state']['params']
  resumed = last_checkpoint(str(tmp_path))['state']['params']
  with pytest.raises(AssertionError):
    assert_same(straight, resumed)


@pytest.mark.parametrize(
  'field, value',
  [('sparsity.forward', 0.95), ('method', 'dense'), ('model.width', 8), ('batch_size', 16)],
)
def test_resume_refuses_a_different_run(field, value, data_dir, finished, tmp_path):
  workdir = copy_of(finished('resnet_fashion_mnist'), tmp_path)
  config = run_config('resnet_fashion_mnist', data_dir)
  section, _, key = field.rpartition('.')
  (config[section] if section else config)[key] = value
  with pytest.raises(checkpoint_lib.RunMismatchError, match=field.replace('.', r'\.')) as e:
    train_and_evaluate(config, str(workdir))
  assert repr(value) in str(e.value) and 'another --workdir' in str(e.value)


def test_resume_may_extend_a_run(data_dir, finished, tmp_path, caplog):
  workdir = copy_of(finished('resnet_fashion_mnist'), tmp_path)
  config = run_config('resnet_fashion_mnist', data_dir)
  config.num_train_steps, config.log_every_steps = 7, 2  # resumable fields
  results = train_and_evaluate(config, str(workdir))
  assert results['resumed_from_step'] == 6 and results['steps'] == 7
  # The schedule is a function of the total: its change is said, not silent.
  assert any('saved with 6 steps in all, now 7' in r.getMessage() for r in caplog.records)


def test_unreadable_checkpoints_fall_back_then_stop(data_dir, finished, tmp_path, caplog):
  workdir = copy_of(finished('resnet_fashion_mnist'), tmp_path)
  checkpoints = workdir / 'checkpoints'
  (checkpoints / '9').mkdir()  # an empty newest checkpoint, as after a failed copy
  saved = json.loads((workdir / 'results.json').read_text())
  results = train_and_evaluate(run_config('resnet_fashion_mnist', data_dir), str(workdir))
  assert results == saved  # fell back to step 6, the end: the finished run, as it was
  assert (checkpoints / 'unreadable_9').is_dir() and not (checkpoints / '9').exists()
  assert any('checkpoints/9 cannot be restored' in r.getMessage() for r in caplog.records)

  for step in ('3', '6'):  # every checkpoint broken: stop, saying how to start afresh
    for f in (checkpoints / step).rglob('*'):
      if f.is_file():
        f.write_bytes(b'')
  with pytest.raises(RuntimeError, match='rm -rf'):
    train_and_evaluate(run_config('resnet_fashion_mnist', data_dir), str(workdir))


def test_config_errors_name_the_field_before_anything_runs(data_dir, tmp_path):
  def error(**changes):
    config = tiny_config('resnet_fashion_mnist', data_dir)
    for field, value in changes.items():
      section, _, key = field.rpartition('__')
      (config[section] if section else config)[key] = value
    with pytest.raises(ValueError) as e:
      train_and_evaluate(config, str(tmp_path / 'run'))
    assert not (tmp_path / 'run').exists()  # nothing written, no setup spent
    return str(e.value)

  assert 'config.dataset' in error(dataset='mnist') and 'fashion_mnist' in error(dataset='mnist')
  assert 'config.model.name' in error(model__name='resnet_18')
  assert 'config.method' in error(method='topk')
  assert 'config.eval_batch_size (500)' in error(eval_batch_size=500)  # 8 devices
  assert 'config.batch_size (12)' in error(batch_size=12)
  assert 'config.log_every_steps' in error(log_every_steps=0)
  assert 'config.sparsity: exploration_l2' in error(sparsity__exploration_l2=float('nan'))
  assert 'config.sparsity: backward_sparsity' in error(sparsity__backward=0.9)

  lm = tiny_config('transformer_xl_sotu', data_dir)
  lm.num_train_steps = 0
  with pytest.raises(ValueError, match='config.num_train_steps must be an integer >= 1'):
    validation.check_config(lm)
  by_epochs = tiny_config('resnet_fashion_mnist', data_dir)
  by_epochs.num_train_steps = -1  # images may train for num_epochs instead
  validation.check_config(by_epochs)

  config = tiny_config('resnet_fashion_mnist', data_dir)
  with config.unlocked():
    config.sparsity.foward = 0.9
  with pytest.raises(ValueError, match=r'unknown field sparsity\.foward \(did you mean'):
    validation.check_config(config)
  del config.sparsity['foward']
  del config['seed']
  with pytest.raises(ValueError, match='missing field seed'):
    validation.check_config(config)


def test_unwritable_workdir_is_reported_before_setup(data_dir, tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  config = tiny_config('resnet_fashion_mnist', data_dir)
  with pytest.raises(ValueError, match='is not writable'):
    train_and_evaluate(config, str(blocker / 'run'))


def test_kill_9_during_training_then_resume(data_dir, tmp_path):
  """SIGKILL of the real program once checkpoints are being written; the rerun resumes."""
  command = [
    sys.executable,
    os.path.join(ROOT, 'tests', 'one_block_main.py'),  # the driver, ResNets of one block per stage
    '--config',
    os.path.join(ROOT, 'configs', 'resnet_fashion_mnist.py'),
    f'--config.data_dir={data_dir}',
    f'--workdir={tmp_path}',
    '--config.model.width=4',
    '--config.batch_size=8',
    '--config.eval_batch_size=8',
    '--config.num_train_steps=40',
    '--config.checkpoint_every_steps=1',
    '--config.eval_every_steps=0',
  ]
  env = dict(os.environ, XLA_FLAGS=xla_flags(2))
  victim = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  checkpoints, deadline = tmp_path / 'checkpoints', time.monotonic() + 300
  while time.monotonic() < deadline and victim.poll() is None:
    if checkpoints.is_dir() and len([p for p in checkpoints.iterdir() if p.name.isdigit()]) >= 2:
      break
    time.sleep(0.05)
  victim.send_signal(signal.SIGKILL)  # most of each step is the save: likely mid-save
  victim.wait()
  assert victim.returncode == -signal.SIGKILL, 'the run ended before it could be killed'
  rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
  assert 'resumed from step' in rerun.stdout
  results = json.loads((tmp_path / 'results.json').read_text())
  assert 0 < results['resumed_from_step'] < 40 and results['steps'] == 40


def test_a_finished_run_run_again_keeps_its_results(data_dir, finished, tmp_path):
  """The same command on a finished workdir reports the run as it was (history included), and
  results.json is left byte for byte as it was."""
  workdir = tmp_path / 'again'
  shutil.copytree(finished('resnet_fashion_mnist'), workdir)
  before = (workdir / 'results.json').read_bytes()
  results = train_and_evaluate(run_config('resnet_fashion_mnist', data_dir), str(workdir))
  assert (workdir / 'results.json').read_bytes() == before
  assert results == json.loads(before) and len(results['history']) == 1


def test_a_second_run_in_a_busy_workdir_refuses(data_dir, tmp_path):
  """While one process trains in a workdir, another refuses at start, naming the workdir and
  the process, before writing anything; the lock dies with its process (even by kill -9)."""
  hold = 'import sys, time\nfrom topkast_jax.training.lock import workdir_lock\n'
  hold += 'with workdir_lock(sys.argv[1]):\n  print("locked", flush=True)\n  time.sleep(120)\n'
  holder = subprocess.Popen(
    [sys.executable, '-c', hold, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=ROOT
  )
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(lock_lib.WorkdirBusyError, match=rf'{tmp_path} is in use by another run \(process {holder.pid}\)'):  # fmt: skip
      train_and_evaluate(run_config('resnet_fashion_mnist', data_dir), str(tmp_path))
    assert not (tmp_path / 'checkpoints').exists() and not (tmp_path / 'metrics.jsonl').exists()
  finally:
    holder.kill()  # SIGKILL: no clean-up runs in the holder
    holder.wait()
  with lock_lib.workdir_lock(str(tmp_path)):  # free again
    pass


@pytest.mark.parametrize(
  'planted',
  [
    {'checkpoints/1/model.pt': b'torch', 'checkpoints/2/weights.bin': b'\x00' * 8},
    {'metrics.jsonl': b'{"step": 3, "my_loss": 0.5}\n{"step": 9, "my_loss": 0.4}\n'},
    {'results.json': b'{"accuracy": 0.93}'},
    {'notes.txt': b'my notes'},
  ],
  ids=['checkpoints', 'metrics', 'results', 'other'],
)
def test_a_workdir_holding_other_files_is_refused_untouched(planted, data_dir, tmp_path):
  for name, data in planted.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes(data)
  before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob('*'))
  with pytest.raises(ValueError, match='holds files this project did not write'):
    train_and_evaluate(run_config('resnet_fashion_mnist', data_dir), str(tmp_path))
  assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob('*')) == before
  for name, data in planted.items():
    assert (tmp_path / name).read_bytes() == data


def test_a_bit_flipped_in_checkpoint_data_is_caught_and_falls_back(
  data_dir, finished, tmp_path, caplog
):
  """One bit flipped in the newest checkpoint's largest array chunk: the restored bytes miss
  their checksum, the checkpoint is set aside, and the run resumes from the one before,
  ending bit for bit as the unbroken run."""
  workdir = copy_of(finished('resnet_fashion_mnist'), tmp_path)
  (workdir / 'results.json').unlink()  # as if the run had stopped right after its last save
  chunks = [p for p in (workdir / 'checkpoints' / '6' / 'state').rglob('d/*') if p.is_file()]
  largest = max(chunks, key=lambda p: p.stat().st_size)
  data = bytearray(largest.read_bytes())
  data[len(data) // 2] ^= 0x10
  largest.write_bytes(bytes(data))
  results = train_and_evaluate(run_config('resnet_fashion_mnist', data_dir), str(workdir))
  assert results['resumed_from_step'] == 3
  assert (workdir / 'checkpoints' / 'unreadable_6').is_dir()
  warning = next(r.getMessage() for r in caplog.records if 'cannot be restored' in r.getMessage())
  assert 'CorruptCheckpointError' in warning, warning
  straight = last_checkpoint(finished('resnet_fashion_mnist'), ('state',))
  assert_same(straight, last_checkpoint(str(workdir), ('state',)))
