"""Chat templates rendered by eagle_jax equal transformers' ``apply_chat_template`` on the same strings."""

import gguf
import pytest
import tokenizers
from tokenizers import models

from eagle_jax import assets
from eagle_jax.models import chat_template

transformers = pytest.importorskip("transformers")

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}")
JSONISH = (
    "{%- for message in messages %}\n  {{- message['role'] }}: {{ message['content'] | tojson }}\n"
    "{% endfor -%}\n{%- if add_generation_prompt %}assistant:{% endif %}")

CONVERSATIONS = [
    [{"role": "user", "content": "Rewrite the plot of Alien as a comedy."}],
    [{"role": "system", "content": "You write short text."},
     {"role": "user", "content": "  Hello there  "}],
    [{"role": "user", "content": "First?"}, {"role": "assistant", "content": "Yes: é, 東京 🎬"},
     {"role": "user", "content": "Second\nline"}],
]


def _smollm2_template():
  reader = gguf.GGUFReader(str(assets.smollm2_gguf()))
  return reader.fields["tokenizer.chat_template"].contents()


def _hf_tokenizer(template):
  vocab = {t: i for i, t in enumerate(["<unk>", "<bos>", "<eos>", "<pad>"])}
  backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>",
                                             eos_token="<eos>", unk_token="<unk>",
                                             pad_token="<pad>")
  tok.chat_template = template
  return tok


def _templates():
  gemma, _ = chat_template.resolve("gemma", None)
  return {"smollm2": _smollm2_template(), "gemma": gemma, "llama3": LLAMA3,
          "mistral": MISTRAL, "tojson": JSONISH, "chatml": chat_template.CHATML}


@pytest.mark.parametrize("name", ["smollm2", "gemma", "llama3", "mistral", "tojson", "chatml"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_equals_transformers(name, add_generation_prompt):
  source = _templates()[name]
  hf = _hf_tokenizer(source)
  ours = chat_template.ChatTemplate(source, {"bos_token": "<bos>", "eos_token": "<eos>",
                                             "unk_token": "<unk>", "pad_token": "<pad>"})
  rendered = 0
  for msgs in CONVERSATIONS:
    try:
      want = hf.apply_chat_template(msgs, tokenize=False,
                                    add_generation_prompt=add_generation_prompt)
    except Exception as e:  # the template refuses this conversation: so must ours
      with pytest.raises(chat_template.ChatTemplateError, match="roles"):
        ours.render(msgs, add_generation_prompt=add_generation_prompt)
      assert "roles" in str(e)
      continue
    assert ours.render(msgs, add_generation_prompt=add_generation_prompt) == want
    rendered += 1
  assert rendered >= 1


def test_smollm2_template_keeps_the_chatml_prompts_with_its_default_system_message():
  ours = chat_template.ChatTemplate(_smollm2_template())
  sys_msg = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
  want = (f"<|im_start|>system\n{sys_msg}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
          "<|im_start|>assistant\n")
  assert ours.render([{"role": "user", "content": "Hi"}]) == want
  want = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
  assert ours.render([{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}],
                     add_generation_prompt=False) == want


def test_gemma_template_folds_the_system_message_into_the_first_turn():
  ours = chat_template.ChatTemplate(chat_template.resolve("gemma", None)[0], {"bos_token": "<bos>"})
  got = ours.render([{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Hi"}])
  assert got == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_resolve_order_and_errors(tmp_path):
  assert chat_template.resolve(None, None) == (chat_template.CHATML, "chatml")
  assert chat_template.resolve("", "{{ x }}") == ("{{ x }}", "model")
  f = tmp_path / "t.jinja"
  f.write_text("{{ messages[0]['content'] }}")
  assert chat_template.resolve(str(f), "{{ x }}") == (f.read_text(), f"file:{f}")
  with pytest.raises(chat_template.ChatTemplateError, match="neither a bundled template"):
    chat_template.resolve("no-such-template", None)
  with pytest.raises(chat_template.ChatTemplateError, match="does not compile"):
    chat_template.ChatTemplate("{% for %}")
  with pytest.raises(ValueError, match=r"messages\[0\] needs 'role'"):
    chat_template.ChatTemplate(chat_template.CHATML).render([{"content": "x"}])
