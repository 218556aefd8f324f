"""Files are written whole or not at all, and never through a planted file or link."""

import json
import os

import pytest

from topkast_jax.atomic import atomic_file
from topkast_jax.training.results import write_json


def test_a_planted_link_at_the_old_temporary_name_is_not_followed(tmp_path):
  victim = tmp_path / 'victim.txt'
  victim.write_text('keep me')
  os.symlink(victim, tmp_path / 'results.json.tmp')  # the fixed name used before
  write_json(str(tmp_path / 'results.json'), {'accuracy': 0.9})
  assert victim.read_text() == 'keep me'
  assert json.loads((tmp_path / 'results.json').read_text()) == {'accuracy': 0.9}
  assert oct((tmp_path / 'results.json').stat().st_mode & 0o777) == '0o644'


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
  path = tmp_path / 'table.md'
  path.write_text('old')
  with pytest.raises(RuntimeError), atomic_file(str(path)) as f:
    f.write('half')
    raise RuntimeError('disk full')
  assert path.read_text() == 'old'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['table.md']
