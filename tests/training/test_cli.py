"""The command line: user errors exit with code 2 and print one line."""

import pytest

import train
from tests.training.conftest import RUN, STEPS


@pytest.fixture(autouse=True)
def _no_global_cache(monkeypatch, tmp_path):
  # train.main() would otherwise switch on the persistent compilation cache in this process.
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "xla"))


@pytest.mark.parametrize("argv, message", [
    (["--config", "configs/none.yaml"], "does not exist"),
    (["model.no_such_field=1"], "model.no_such_field: unknown key"),
    (["train.batch_size=0"], "train.batch_size=0: must be a positive integer"),
    (["train.data=/no/such/corpus.txt"], "train.data='/no/such/corpus.txt'"),
    (["--coordinator_address", "localhost:1234"], "give all three"),
    (["train.batch_size=4"], "must be a multiple of 8"),     # 8 fake devices split the batch
    (["--steps", "0"], "train.steps=0"),                      # 0 is not "unset" (issue 17)
    (["train.learning_rate=.inf"], "train.learning_rate=inf: must be a finite number > 0"),
    (["train.learning_rate=.nan"], "train.learning_rate=nan: must be a finite number > 0"),
])
def test_user_errors_exit_2_with_one_line(argv, message, capsys, tmp_path):
  assert train.main(["--workdir", str(tmp_path / "w"), *argv]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("train: error:") and message in err, err


def test_bad_flag_exits_2_with_one_line(capsys):
  with pytest.raises(SystemExit) as e:
    train.main(["--steps", "many"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "--steps" in err, err


def test_existing_run_needs_resume_and_the_same_model(run_a, capsys):
  workdir, _ = run_a
  assert train.main(["--workdir", str(workdir), "--steps", str(STEPS), *RUN]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "add --resume" in err, err
  # On resume the run's config.yaml rules: other values of its fixed fields are refused (one line
  # naming the field, the run's value and the given one), before anything is built or written.
  before = sorted(p.name for p in workdir.iterdir())
  log = (workdir / "train.log").read_text()
  for extra, want in ((["model.d_model=48"], "model.d_model cannot change on resume: "
                       "model.d_model is 32 in"),
                      (["train.seed=1"], "train.seed is 0 in"),
                      (["train.steps=9", "train.data=synthetic"], "train.data is 'stdlib' in"),
                      (["--config", "configs/tiny.yaml"], "--config configs/tiny.yaml is not this "
                       "run's config: model.d_model is 32 in")):
    assert train.main(["--workdir", str(workdir), "--resume", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and want in err, err
  assert "given 48 (may change: steps, learning_rate" in train_error(workdir, "model.d_model=48",
                                                                    capsys)
  assert sorted(p.name for p in workdir.iterdir()) == before
  assert (workdir / "train.log").read_text() == log


def train_error(workdir, override, capsys) -> str:
  assert train.main(["--workdir", str(workdir), "--resume", override]) == 2
  return capsys.readouterr().err


def test_a_config_that_is_not_utf8_is_one_line(capsys, tmp_path):
  bad = tmp_path / "bad.yaml"
  bad.write_bytes(b"model:\n  d_model: \xff\xfe\n")
  assert train.main(["--workdir", str(tmp_path / "w"), "--config", str(bad)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "not UTF-8 text (byte 0xff" in err, err
