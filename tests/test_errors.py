"""User-facing errors: damaged model and data files, bad configs and flags, non-finite arrays.

Each test runs the real code on a damaged input in ``tmp_path`` (or a bad config override) and
checks that the error names the file, field or flag and what was expected; launchers are run as
subprocesses and must exit non-zero with one line on stderr and no traceback.
"""

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from decoder_fixtures import make_torch_llama, save_torch
from test_loading import write_gguf

from configs import encoder_ml100k, movielens_smoke, wals_ml100k
from eagle_jax import checks, data, training
from eagle_jax.agent import trainer
from eagle_jax.agent.features import TextFeatures
from eagle_jax.data import synthetic
from eagle_jax.embed import encoder_train, wals_train
from eagle_jax.evaluation import agent_eval
from eagle_jax.models import loading
from eagle_jax.models.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------------
# Model files.


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory):
  path = write_gguf(make_torch_llama(), tmp_path_factory.mktemp("gguf") / "tiny.gguf")
  return path.read_bytes()


@pytest.mark.parametrize("damage, match", [
    (lambda b: b[: len(b) // 2], r"truncated: tensor '.*' needs \d+ bytes at offset \d+, file has"),
    (lambda b: b[:-5], r"truncated: tensor 'blk\.1\.ffn_down\.weight' needs"),
    (lambda b: b[:200], r"truncated: the header needs \d+ bytes at offset \d+, file has 200"),
    (lambda b: b[:10], r"truncated: the header needs"),
    (lambda b: b"PK\x03\x04" + b[4:], r"not a GGUF file \(bad magic b'PK\\x03\\x04', expected b'GGUF'\)"),
    (lambda b: b"", r"not a GGUF file \(bad magic b''"),
    (lambda b: b[:4] + b"\x63\x00\x00\x00" + b[8:], r"corrupt GGUF header"),
], ids=["half", "last-bytes", "header", "tiny", "zip", "empty", "version"])
def test_damaged_gguf_names_file_and_problem(tmp_path, gguf_bytes, damage, match):
  path = tmp_path / "bad.gguf"
  path.write_bytes(damage(gguf_bytes))
  for load in (loading.load_llama_gguf, Tokenizer.from_gguf):
    with pytest.raises(loading.LoadingError, match=match) as e:
      load(path)
    assert str(path) in str(e.value)


def test_gguf_nan_weight_is_refused(tmp_path, gguf_bytes):
  raw = bytearray(gguf_bytes)
  raw[-40:-36] = np.float32(np.nan).tobytes()
  path = tmp_path / "nan.gguf"
  path.write_bytes(bytes(raw))
  with pytest.raises(loading.LoadingError, match=r"nan\.gguf: tensor 'blk\.1\.ffn_down\.weight': "
                     r"1 non-finite value"):
    loading.load_llama_gguf(path)


@pytest.fixture(scope="module")
def st_dir(tmp_path_factory):
  return save_torch(make_torch_llama(), tmp_path_factory.mktemp("st"))


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b"x" * 100,
                                    lambda b: b[:6]], ids=["half", "garbage", "header"])
def test_damaged_safetensors_names_file(tmp_path, st_dir, damage):
  d = shutil.copytree(st_dir, tmp_path / "m")
  f = d / "model.safetensors"
  f.write_bytes(damage(f.read_bytes()))
  with pytest.raises(loading.LoadingError, match=rf"{f}: not a readable safetensors file"):
    loading.load_llama_safetensors(d)


def test_bad_config_json_names_file(tmp_path, st_dir):
  d = shutil.copytree(st_dir, tmp_path / "m")
  (d / "config.json").write_text("{bad")
  with pytest.raises(loading.LoadingError, match=rf"{d / 'config.json'}: not valid JSON"):
    loading.load_llama_safetensors(d)


# --------------------------------------------------------------------------------------------------
# Ratings files.


@pytest.fixture(scope="module")
def csv_dir(tmp_path_factory):
  ratings = synthetic.generate_ratings(num_users=30, num_items=40, num_ratings=300, seed=1)
  return synthetic.write_movielens_csv(ratings, tmp_path_factory.mktemp("csv"))


def _edit_line(path, lineno, column, value):
  lines = path.read_text().splitlines()
  parts = lines[lineno - 1].split(",")
  parts[column] = value
  lines[lineno - 1] = ",".join(parts)
  path.write_text("\n".join(lines) + "\n")


def test_bom_is_skipped(tmp_path, csv_dir):
  d = shutil.copytree(csv_dir, tmp_path / "d")
  for name in ("ratings.csv", "movies.csv"):
    (d / name).write_bytes(b"\xef\xbb\xbf" + (d / name).read_bytes())
  assert data.load_movielens(d).num_ratings == 300


def test_latin1_byte_names_file_line_and_byte(tmp_path, csv_dir):
  d = shutil.copytree(csv_dir, tmp_path / "d")
  with open(d / "movies.csv", "ab") as f:
    f.write(b'99999,"Caf\xe9 (1999)",Drama\n')
  with pytest.raises(data.DataFormatError, match=r"movies\.csv, line 42: byte 0xe9 at column 11 "
                     r"is not valid utf8 text"):
    data.load_movielens(d)


def test_duplicate_rating_names_lines_and_file_ids(tmp_path, csv_dir):
  d = shutil.copytree(csv_dir, tmp_path / "d")
  lines = (d / "ratings.csv").read_text().splitlines()
  user, movie = lines[5].split(",")[:2]
  (d / "ratings.csv").write_text("\n".join(lines + [lines[5]]) + "\n")
  with pytest.raises(data.DataFormatError, match=rf"ratings\.csv, line 302: duplicate rating of "
                     rf"userId {user}, movieId {movie} \(first at line 6\)"):
    data.load_movielens(d)


@pytest.mark.parametrize("value", ["6.0", "3.3", "0", "-1"])
def test_off_scale_csv_rating_is_refused(tmp_path, csv_dir, value):
  d = shutil.copytree(csv_dir, tmp_path / "d")
  _edit_line(d / "ratings.csv", 3, 2, value)
  with pytest.raises(data.DataFormatError, match=r"ratings\.csv, line 3, field 'rating': rating "
                     r".* is off the scale: expected 0\.5 to 5 in steps of 0\.5"):
    data.load_movielens(d)


def test_ml100k_half_star_is_refused(tmp_path):
  flags = "|".join(["0"] * 19)
  (tmp_path / "u.item").write_text("".join(f"{i}|Movie {i} (1995)|01-Jan-1995|||{flags}\n"
                                           for i in (1, 2)))
  (tmp_path / "u.data").write_text("1\t1\t5\t100\n1\t2\t3\t101\n2\t1\t1\t102\n2\t2\t4.5\t103\n")
  d = tmp_path
  with pytest.raises(data.DataFormatError, match=r"u\.data, line 4, field 'rating': rating 4\.5 "
                     r"is off the scale: expected 1 to 5 in steps of 1"):
    data.load_movielens(d)


def test_negative_timestamp_is_refused(tmp_path, csv_dir):
  d = shutil.copytree(csv_dir, tmp_path / "d")
  _edit_line(d / "ratings.csv", 4, 3, "-5")
  with pytest.raises(data.DataFormatError, match=r"line 4, field 'timestamp': negative value"):
    data.load_movielens(d)


# --------------------------------------------------------------------------------------------------
# Non-finite arrays.


def test_nan_row_in_embeddings_npz_is_refused(tmp_path):
  path = tmp_path / "embeddings.npz"
  f = np.ones((4, 3), np.float32)
  f[2, 1] = np.nan
  np.savez(path, item_ids=np.arange(4), item_factors=f, item_bias=np.zeros(4, np.float32))
  with pytest.raises(checks.NonFiniteError, match=r"embeddings\.npz: item_factors: 1 non-finite "
                     r"value\(s\), first at row 2"):
    wals_train.load_npz(str(path), item_ids=np.arange(4))


def test_non_finite_text_features_name_the_text():
  def encode(texts):
    return np.array([[np.nan, 0.0] if "bad" in t else [1.0, 0.0] for t in texts], np.float32)

  feats = TextFeatures(encode, 2, name="E_D output")
  with pytest.raises(checks.NonFiniteError, match=r"E_D output: non-finite values for the text "
                     r"'a bad plot'"):
    feats(["a good plot", "a bad plot"])


# --------------------------------------------------------------------------------------------------
# Config fields, checked at the job's entry.


@pytest.fixture(scope="module")
def mesh():
  return training.build_mesh({"data": -1})


def _override(config, path, value):
  block = config
  *parents, last = path.split(".")
  for p in parents:
    block = block[p]
  with config.unlocked():
    block[last] = value
  return config


RUN_OVERRIDES = [
    ("actions.k", 1), ("reference.exploratory_m", 0), ("reference.exploratory_m", 99),
    ("rl.horizon", 0), ("rl.gamma", 0.0), ("rl.gae_lambda", 1.5), ("rl.kl_coef", -1.0),
    ("rl.value_coef", -0.5), ("rl.entropy_coef", -0.1), ("rl.optim.learning_rate", 0.0),
    ("rl.optim.b2", 1.0), ("reference.optim.final_lr_fraction", 2.0),
    ("reference.design_eps", 0.0), ("reference.design_max_iters", 0),
    ("reference.design_ridge", -1.0), ("checkpoint.max_to_keep", 0), ("policy.hidden", 0),
    ("utility.lam", -1.0), ("utility.k", 0), ("utility.reward", "money"), ("world.anchor_pool", 2),
    ("env.max_sentences", 0), ("actions.dedupe_threshold", 1.5), ("llm.gguf", "/nope.gguf"),
    ("wals.data.test_fraction", 1.0), ("wals.data.source", "/no/such/folder"),
    ("wals.wals.rank", 0), ("wals.eval.recall_k", 0), ("wals.eval.clip_max", 0.5),
    ("encoder.heldout_fraction", 0.0), ("encoder.head.dropout", 1.0),
    ("encoder.finetune.learning_rate", -1.0), ("encoder.embeddings", "/no/embeddings.npz"),
    ("encoder.target", "logits"), ("encoder.finetune.precision", "half"), ("seed", -1),
]


@pytest.mark.parametrize("path, value", RUN_OVERRIDES, ids=[f"{p}={v}" for p, v in RUN_OVERRIDES])
def test_run_config_is_refused_at_entry_naming_the_field(mesh, path, value):
  config = _override(movielens_smoke.get_config(), path, value)
  t0 = time.perf_counter()
  with pytest.raises(checks.ConfigError) as e:
    trainer.validate(config, mesh)
  assert time.perf_counter() - t0 < 2.0
  assert f"config.{path}" in str(e.value), str(e.value)


def test_actions_k_is_named_before_exploratory_m(mesh):
  config = _override(movielens_smoke.get_config(), "actions.k", 1)
  with pytest.raises(checks.ConfigError, match=r"config\.actions\.k=1: expected an int >= 2"):
    trainer.validate(config, mesh)


@pytest.mark.parametrize("path, value", [("samples", 0), ("confidence", 1.5), ("confidence", 0.0),
                                         ("trajectories", -1), ("elm_steps", 0), ("elm_lr", 0.0),
                                         ("elm_workdir", "/no/elm/run")])
def test_eval_config_is_refused_naming_the_field(path, value):
  config = _override(movielens_smoke.get_config(), f"eval.{path}", value)
  with pytest.raises(checks.ConfigError, match=rf"config\.eval\.{path}="):
    agent_eval.EvalConfig.from_config(config.eval)


@pytest.mark.parametrize("path, value", [("data.min_train", -1), ("checkpoint.every", 0),
                                         ("wals.reg", 0.0), ("data.source", "")])
def test_wals_job_config_names_the_field(path, value):
  config = _override(wals_ml100k.get_config(), path, value)
  with pytest.raises(checks.ConfigError) as e:
    wals_train.check_config(config)
  assert f"config.{path}" in str(e.value)


def test_encoder_job_refuses_missing_inputs_before_work(tmp_path, monkeypatch):
  def expensive(*args, **kwargs):
    raise AssertionError("heavy work started before the config was checked")

  monkeypatch.setattr(wals_train, "load_data", expensive)
  config = _override(encoder_ml100k.get_config(), "embeddings", str(tmp_path / "none.npz"))
  with pytest.raises(checks.ConfigError, match=r"config\.embeddings='.*none\.npz': no such file"):
    encoder_train.run(config, str(tmp_path / "w"))
  config = _override(encoder_ml100k.get_config(), "descriptions", str(tmp_path / "d.jsonl"))
  with pytest.raises(checks.ConfigError, match=r"config\.descriptions='.*d\.jsonl': no such file"):
    encoder_train.run(config, str(tmp_path / "w"))


# --------------------------------------------------------------------------------------------------
# Launchers: one line on stderr, non-zero exit, no traceback.


def _launch(module: str, *args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("module, args, match", [
    ("launch.train", ["--config.policy.hiddn=3", "--workdir=/tmp/unused"],
     "--config.policy.hiddn: unknown config field 'hiddn'; did you mean 'hidden'?"),
    ("launch.wals", ["--config=configs/wals_ml100k.py", "--config.wals.rnk=3", "--workdir=/tmp/x"],
     "--config.wals.rnk: unknown config field 'rnk'; did you mean 'rank'?"),
    ("launch.wals", ["--config=nope.py", "--workdir=/tmp/x"],
     "--config: cannot load the config file"),
    ("launch.train_encoder", ["--config=configs/encoder_ml100k.py",
                              "--config.embeddings=/no/such/embeddings.npz", "--workdir={tmp}"],
     "config.embeddings='/no/such/embeddings.npz': no such file"),
    ("launch.serve_env", ["--gguf=/no/such/model.gguf", "--port=0"],
     "--gguf='/no/such/model.gguf': no such file"),
], ids=["unknown-field-default-config", "unknown-field", "missing-config", "missing-embeddings",
        "missing-gguf"])
def test_launcher_prints_one_line_without_traceback(tmp_path, module, args, match):
  proc = _launch(module, *[a.replace("{tmp}", str(tmp_path)) for a in args])
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr, proc.stderr
  errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
  assert len(errors) == 1 and match in errors[0], proc.stderr
