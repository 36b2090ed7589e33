"""The launchers' shared entry: config flags and ``run(main)`` that report a user error in one line.

A user error (an unknown ``--config.<field>``, a bad flag value, a config file that does not load,
a ``ConfigError`` / ``DataFormatError`` / ``LoadingError`` / ``AssetError`` / ``app.UsageError``
raised by the job) is printed to stderr as one line, ``<launcher>: error: <message>``, and the
process exits with status 2 (flags and config) or 1 (inputs), without a traceback. Anything else is
a bug and keeps its traceback.

ml_collections parses the ``--config.<field>`` overrides while the flag is defined when
``--config`` itself is not given (its default is parsed then), so the definition is guarded too
(``define_config``), not only flag parsing (``run``).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence

from absl import app, flags
from ml_collections import config_flags

from eagle_jax import assets, checks

# Errors whose message already names the file, field or flag and what was expected.
USER_ERRORS = (checks.InputError, app.UsageError, assets.AssetError)
_DID_YOU_MEAN = re.compile(r'Did you mean "([^"]+)" instead of "([^"]+)"')
_CONFIG_FLAGS: list[tuple[str, flags.FlagHolder]] = []  # (name, holder) of define_config


def _prog() -> str:
  path = sys.argv[0] if sys.argv else "launch"
  stem = os.path.splitext(os.path.basename(path))[0]
  return f"launch.{stem}" if os.path.basename(os.path.dirname(path)) == "launch" else stem


def fail(message: str, status: int = 1) -> None:
  """Prints ``<launcher>: error: <message>`` (one line) to stderr and exits with ``status``."""
  text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
  print(f"{_prog()}: error: {text}", file=sys.stderr, flush=True)
  sys.exit(status)


def _config_override(argv: Sequence[str], name: str, key: str) -> str | None:
  """The ``--<name>.a.b`` flag of ``argv`` whose path contains ``key``."""
  for arg in argv:
    flag = arg.split("=", 1)[0]
    if flag.lstrip("-").startswith(name + ".") and key in flag.lstrip("-").split("."):
      return flag
  return None


def describe_flag_error(error: BaseException, argv: Sequence[str], name: str = "config") -> str:
  """One line for an error raised while parsing flags or a config file and its overrides."""
  text = str(error.args[0]) if error.args else str(error)
  text = text.replace("\\'", "'").replace("\\n", "\n")
  match = _DID_YOU_MEAN.search(text)
  if isinstance(error, (AttributeError, KeyError)):
    key = match.group(2) if match else text.splitlines()[0].strip("'\" ")
    flag = _config_override(argv, name, key) or f"--{name}"
    hint = f"; did you mean {match.group(1)!r}?" if match else ""
    return f"{flag}: unknown config field {key!r}{hint}"
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if "Traceback (most recent call last):" in lines:
    # absl embeds the config file's traceback in the flag error: keep its first and last lines.
    last = lines[-1].split(": ", 1)[-1] if ":" in lines[-1] else lines[-1]
    return f"{lines[0].rstrip(':')}: {last}"
  return " ".join(lines)


def define_config(name: str, default: str | None, help_string: str, **kwargs):
  """``config_flags.DEFINE_config_file`` (locked config) whose override errors exit in one line."""
  try:
    holder = config_flags.DEFINE_config_file(name, default, help_string, lock_config=True,
                                             **kwargs)
  except Exception as e:  # noqa: BLE001 (any failure here is a bad flag or config file)
    fail(describe_flag_error(e, sys.argv, name), status=2)
  _CONFIG_FLAGS.append((name, holder))
  return holder


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    rest = flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 (flag values and config files are user input)
    fail(describe_flag_error(e, argv), status=2)
  for name, holder in _CONFIG_FLAGS:
    try:
      _ = holder.value.to_dict  # a config file that failed to load raises only when read
    except OSError as e:
      lines = [line.strip() for line in str(e).splitlines() if line.strip()]
      fail(f"--{name}: cannot load the config file: {lines[-1] if lines else e}", status=2)
  return rest


def run(main: Callable[[list[str]], None], *, required: Sequence[str] = ()) -> None:
  """``app.run(main)`` that prints user errors (``USER_ERRORS``) as one line and exits non-zero.

  Args:
    main: the launcher's main, taking ``argv``.
    required: flags that must be given (``flags.mark_flags_as_required``).
  """
  if required:
    flags.mark_flags_as_required(list(required))

  def guarded(argv: list[str]) -> None:
    try:
      main(argv)
    except app.UsageError as e:
      fail(str(e), status=2)
    except USER_ERRORS as e:
      fail(str(e), status=1)

  app.run(guarded, flags_parser=_parse_flags)
