"""Chat templates: the model file's Jinja template rendered the way transformers renders it.

A chat model's prompt format is a Jinja2 template shipped with the model (``tokenizer.chat_template``
in a GGUF, ``chat_template`` in a Hugging Face tokenizer config). ``ChatTemplate`` compiles it with
the environment transformers and llama.cpp's server use for the same strings: a sandboxed
``ImmutableSandboxedEnvironment`` with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols``
extension, the globals ``raise_exception`` and ``strftime_now`` and a ``tojson`` filter that keeps
non-ASCII text (``ensure_ascii=False``); ``render`` passes ``messages``, ``add_generation_prompt``
and the special-token strings (``bos_token``, ``eos_token``, ...). A model without a template gets
ChatML (``CHATML``), the format SmolLM2 and many small models use.

``resolve`` picks the template: an explicit override (a bundled template's name from
``chat_templates/``, e.g. ``"gemma"`` for Gemma base checkpoints whose GGUF carries none, or a
``.jinja`` file), else the model file's, else ChatML.
"""

from __future__ import annotations

import datetime
import json
import pathlib
from collections.abc import Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")
_BUNDLED = pathlib.Path(__file__).parent / "chat_templates"


class ChatTemplateError(ValueError):
  """A template failed to compile or raised (``raise_exception``) while rendering."""


def bundled() -> list[str]:
  """Names of the templates shipped in ``chat_templates/``."""
  return sorted(p.stem for p in _BUNDLED.glob("*.jinja"))


def resolve(override: str | None, from_model: str | None) -> tuple[str, str]:
  """The template source and where it came from ("bundled:<name>", "file:<path>", "model",
  "chatml").

  Args:
    override: a bundled template's name, a path to a Jinja file, or None/"" (no override).
    from_model: the model file's template (None/"" when it has none).
  """
  if override:
    if override in bundled():
      return (_BUNDLED / f"{override}.jinja").read_text(), f"bundled:{override}"
    path = pathlib.Path(override)
    if path.is_file():
      return path.read_text(), f"file:{path}"
    raise ChatTemplateError(f"chat template {override!r}: neither a bundled template "
                            f"({bundled()}) nor a file")
  if from_model:
    return from_model, "model"
  return CHATML, "chatml"


def _raise(message: str):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


class ChatTemplate:
  """A compiled chat template.

  Args:
    source: the Jinja2 template text.
    special_tokens: strings passed to the template (``bos_token``, ``eos_token``, ...).
    origin: where the template came from (``resolve``), for errors and reports.
  """

  def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None,
               origin: str = "model"):
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
      self._template = env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
      raise ChatTemplateError(f"chat template ({origin}) does not compile: {e}") from None
    self.source = source
    self.origin = origin
    self.special_tokens = dict(special_tokens or {})

  def render(self, messages: Sequence[Mapping[str, str]], *,
             add_generation_prompt: bool = True) -> str:
    """The prompt text of ``messages`` (dicts with ``role`` and ``content``)."""
    if not messages:
      raise ValueError("chat template: messages is empty")
    for i, m in enumerate(messages):
      if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
        raise ValueError(f"chat template: messages[{i}] needs 'role' and 'content', got {m!r}")
    try:
      return self._template.render(messages=[dict(m) for m in messages], tools=None,
                                   documents=None, add_generation_prompt=add_generation_prompt,
                                   **self.special_tokens)
    except jinja2.exceptions.TemplateError as e:
      raise ChatTemplateError(f"chat template ({self.origin}): {e}") from None
